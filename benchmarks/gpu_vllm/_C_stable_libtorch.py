"""Stand-in for vLLM's compiled CUDA ops library on a GPU machine without vLLM's wheel (see
benchmarks/gpu_vllm.sh). It defines only the capability queries vLLM calls while importing, each
answering "not supported", so vLLM takes its native torch and Triton paths; every real kernel op
stays undefined, and calling one fails loudly."""
import torch

_lib = torch.library.Library("_C", "FRAGMENT")
for _name in ("cutlass_scaled_mm_supports_fp8", "cutlass_scaled_mm_supports_block_fp8",
              "cutlass_group_gemm_supported", "cutlass_scaled_mm_supports_fp4"):
    _lib.define(f"{_name}(int cuda_device_capability) -> bool")
    _lib.impl(_name, lambda cuda_device_capability: False, "CompositeExplicitAutograd")

# Activation layers keep their op when built (SiluAndMul: torch.ops._C.silu_and_mul) even when they
# will run their native forward (custom_ops=none): those ops are defined here to raise if ever called.
def _not_here(name):
    def missing(*args, **kwargs):
        raise NotImplementedError(f"vLLM's compiled op _C::{name} is not on this machine (benchmarks/gpu_vllm.sh)")

    return missing


for _name in ("silu_and_mul", "mul_and_silu", "gelu_and_mul", "gelu_tanh_and_mul", "fatrelu_and_mul",
              "gelu_new", "gelu_fast", "gelu_quick", "gelu_tanh"):
    _lib.define(f"{_name}(Tensor(a!) out, Tensor input) -> ()")
    _lib.impl(_name, _not_here(_name), "CompositeExplicitAutograd")


# CUDA graph capture keeps each graph's output through torch.ops._C.weak_ref_tensor (a tensor over the
# same memory that does not keep it alive). Python cannot make a non-owning tensor simply, so this
# returns an alias that does: a captured graph's output memory then lives as long as the graph
# entry, which costs memory (no two graphs share output memory), not correctness.
_lib.define("weak_ref_tensor(Tensor(a) tensor) -> Tensor(a)")
_lib.impl("weak_ref_tensor", lambda tensor: tensor.view(tensor.shape), "CompositeExplicitAutograd")
