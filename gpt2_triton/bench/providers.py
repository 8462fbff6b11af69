"""What a kernel bench compares: ours, eager PyTorch and torch.compile of it as providers, the fwd / bwd /
fwd+bwd callables of one provider, and the fp32 reference each is checked against."""
import torch

from gpt2_triton.bench.env import has_cuda


def run_modes(forward, inputs, modes):
    """Build the callables for "fwd", "bwd" (backward of a retained graph) and "fwd+bwd".

    forward() -> output tensor; inputs: tensors whose grads are reset between reps. Nothing runs
    until a callable is first called (the graph for "bwd" is built then), so a provider that fails
    fails inside measure() and gives an error row, and its compile time lands in the first call.
    """
    graph = {}

    def retained():  # (out, grad_out) of one forward with autograd, built once
        if not graph:
            out = forward()
            graph.update(out=out, grad_out=torch.randn_like(out))
        return graph["out"], graph["grad_out"]

    def fwd():
        with torch.no_grad():
            forward()

    def bwd():
        out, grad_out = retained()
        out.backward(grad_out, retain_graph=True)

    def fwd_bwd():
        grad_out = retained()[1]
        forward().backward(grad_out)

    fns = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
    return {mode: fns[mode] for mode in modes}


class Reference:
    """The fp32 reference of one case, to check each provider against on the timed inputs (`max_err`).

    reference(*inputs) runs on fp32 copies of `inputs` (integer tensors as they are); its output and the
    gradients of the floating inputs that require grad are computed once, on first use, with a seeded
    incoming gradient that every provider receives too (cast to its output's dtype).
    `errors(forward, leaves, view)` gives a provider's mode -> max abs error: "fwd" its output (one forward
    without autograd), "bwd" and "fwd+bwd" the output and every gradient of `leaves` (one forward and
    backward; view(grads) maps them onto the reference's inputs where the layouts differ). Each computed
    once per provider when a row first asks, after its timing; nothing runs for a provider no row measures."""

    def __init__(self, reference, inputs, grads=True):
        self.reference, self.inputs, self.grads = reference, list(inputs), grads
        self._result = None

    def result(self):
        if self._result is None:
            copies = [t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t
                      for t in self.inputs]
            leaves = [t for t in copies if t.is_floating_point() and t.requires_grad] if self.grads else []
            with torch.enable_grad() if leaves else torch.no_grad():
                out = self.reference(*copies)
            gen = torch.Generator(device=out.device).manual_seed(0)
            grad_out = torch.randn(out.shape, device=out.device, generator=gen)
            grads = torch.autograd.grad(out, leaves, grad_out) if leaves else ()
            self._result = out.detach(), grad_out, list(grads)
        return self._result

    def errors(self, forward, leaves=(), view=None):
        """mode -> max abs error of forward() (and of its leaves' grads for bwd modes), cached."""
        cache = {}

        def of(mode):
            key = "fwd" if mode == "fwd" else "bwd"
            if key not in cache:
                ref_out, grad_out, ref_grads = self.result()
                leaves_ = [t for t in leaves if t.requires_grad] if self.grads and key == "bwd" else []
                with torch.enable_grad() if leaves_ else torch.no_grad():  # the graph its timed rows ran
                    out = forward()
                errors = [_max_abs(out, ref_out)]
                if leaves_:
                    grads = list(torch.autograd.grad(out, leaves_, grad_out.to(out.dtype)))
                    errors += [_max_abs(g, r) for g, r in zip(view(grads) if view else grads, ref_grads)]
                cache[key] = max(errors)
            return cache[key]
        return of


def _max_abs(x, ref) -> float:
    if x.shape != ref.shape:
        raise ValueError(f"shape {tuple(x.shape)} differs from the reference's {tuple(ref.shape)}")
    return float((x.detach().float() - ref).abs().max()) if ref.numel() else 0.0


COMPILE_BASELINES = ("compile", "compile-max-autotune")  # torch.compile of the eager code: default, max-autotune
# max-autotune benchmarks candidate GEMM and Triton templates on the device: minutes per graph, CUDA only
MAX_AUTOTUNE_SKIPPED = "max-autotune runs on CUDA without --quick only"


class Skipped(Exception):
    """A provider not run here; its rows say why (measure() gives "Skipped: <reason>")."""


def skipped(reason):
    """A provider that raises Skipped(reason) when called: its rows are error rows naming the reason."""
    def provider(*args, **kwargs):
        raise Skipped(reason)
    return provider


def kernel_providers(ours, eager, quick=False):
    """Ours, the eager PyTorch code and (on CUDA) torch.compile of that same eager code, specialised
    to each shape (dynamic=False: a second shape recompiles statically instead of going dynamic), with
    the default mode ("compile") and mode="max-autotune" ("compile-max-autotune": on CPU or with --quick
    a provider whose rows say it was skipped and why)."""
    out = {"triton": ours, "eager": eager}
    if has_cuda():
        out["compile"] = torch.compile(eager, dynamic=False)
    out["compile-max-autotune"] = (torch.compile(eager, dynamic=False, mode="max-autotune")
                                   if has_cuda() and not quick else skipped(MAX_AUTOTUNE_SKIPPED))
    return out
