// The checks every C++ attention op makes of its tensors before touching them (the Python side checks them first,
// with messages for users; these keep a direct call of the op from reading out of bounds). `op` names the op in the
// messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace hybridrag_cpu {

// q (B, H, Tq, D), k/v (B, Hkv, Tk, D): 4-d CPU tensors of one float dtype, H a multiple of Hkv, unit last strides.
inline void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-d (B, H, T, D)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), op, ": CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
              ": float32, bfloat16 or float16 inputs");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(3) == k.size(3), op,
              ": k and v (B, Hkv, Tk, D) must match q (B, H, Tq, D)");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": H must be a multiple of Hkv");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, op, ": unit last strides");
  TORCH_CHECK(scale > 0, op, ": scale must be positive");
}

// What a backward reads besides q, k, v: out and grad_out like q, lse and grad_lse (optional) float32 (B, H, Tq).
inline void check_backward_inputs(const char* op, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                                  const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse) {
  TORCH_CHECK(out.sizes() == q.sizes() && grad_out.sizes() == q.sizes() && out.stride(3) == 1 &&
                  grad_out.stride(3) == 1 && out.scalar_type() == q.scalar_type() &&
                  grad_out.scalar_type() == q.scalar_type(),
              op, " backward: out and grad_out must be q's shape and dtype with unit last stride");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.sizes() == q.sizes().slice(0, 3), op,
              " backward: lse must be contiguous float32 (B, H, Tq)");
  TORCH_CHECK(!grad_lse.has_value() || (grad_lse->scalar_type() == at::kFloat && grad_lse->is_contiguous() &&
                                        grad_lse->sizes() == lse.sizes()),
              op, " backward: grad_lse must be contiguous float32 (B, H, Tq)");
}

}  // namespace hybridrag_cpu
