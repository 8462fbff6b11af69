"""Error text for people: one line, whatever the exception's own text looks like."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's text on one line (torch's messages span several), cut to `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
