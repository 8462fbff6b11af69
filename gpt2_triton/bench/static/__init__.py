"""Static performance profile of the Triton kernels at GPT-2 124M training shapes, with no GPU.

    python -m gpt2_triton.bench.static --out DIR [--python OTHER_PYTHON] [--quick] [--jobs N]

What it measures, and how:
- Launches. GPT-2 124M (gpt2 preset, pad_vocab_to=128) runs `gpt2_triton.training.step.accumulate_gradients` with
  kernels="triton" under bf16 autocast on fake tensors (`trace.capture`): every Triton kernel is a
  recorder, so the real launchers choose their configs, grids and arguments as on a GPU and nothing
  runs. The same is done for each op's forward + backward (`cases.OP_CALLS`). Each distinct launch
  (kernel + specialization), for every autotune candidate its autotuner would try there, is a compile
  case (`cases.gpt2_cases`).
- Code. Each case is compiled for sm_90 by a worker process (`native`) under this python's triton and,
  with --python, under another interpreter's (e.g. triton 3.6, the GPU machine's): registers and spill
  bytes from ptxas -v, shared memory, CTAs per SM on an H100 (`profile.ctas_per_sm`), how each tl.dot
  lowered (wgmma or not), TMA use, and the SASS of every loop: instructions per iteration by opcode
  class (loops found from backward branches in `nvdisasm -c -gi`; see `native`).
- Bytes. A TorchDispatchMode sums the bytes each aten op reads and writes and each Triton launch
  reads and writes (tensor arguments the kernel loads from / stores to, each once: tile re-reads are
  assumed to hit L2), per op call against the op's minimum, and per micro-step (see `trace`).
- Launch counts. Per micro-step: Triton launches by kernel, other device ops by aten name, host syncs.
- Predicted throughput (`predict`, not a measurement): each traced device op's FLOPs (`flops`) and bytes on a
  roofline per GPU (H100 SXM, H200, B200) and efficiency band, summed into tok/s and MFU for
  kernels="triton", "torch" and an llm.c-style variant; `--predict-only` prints it alone.

Output: DIR/static.json (everything) and DIR/static.md (tables). tests/test_static.py runs a fast
subset as regression gates with budgets.
"""
