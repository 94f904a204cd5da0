"""The operators a saved torch graph (``program.json``) may call: an explicit allow-list, and a rule
on each operator's schema that no list entry may break.

Why a list and not namespaces: ``aten`` holds operators with effects beyond computing their outputs —
``aten::from_file`` maps a file of the artifact's choosing into a tensor (and, with an in-place
copy, writes it), ``aten::_print`` writes to the terminal, ``aten::save``-like and random operators
exist too. Loading checks a file's integrity, not what its graph does; this list is what it may do.

The list is what torchkiln's IR and frontends emit, derived, not guessed:

- :data:`CORE`: torch's *core ATen* operator set (``torch.Tag.core``), which ``torch.export``'s
  decompositions lower every other operator to — a graph the torch backend cannot save with its
  own operators is saved through those decompositions — less the ones the schema rule refuses and
  the uninitialised-memory factories (``empty``, ``empty_strided``);
- :data:`IR`: the higher-level operators the passes and the export frontend leave in graphs (conv,
  linear, layer_norm, attention, recurrent layers) and torchkiln's quantized operators;
- :data:`COMMON`: functional operators of that level that models use often, so their graphs keep
  their form instead of being decomposed.

``tests/test_torch_operators.py`` compiles the model zoo and coverage models and proves every
operator they emit is on the list, and that every entry passes :func:`refusal` — so a new pass
cannot widen it silently. The rule (:func:`refusal`): an operator that writes into an argument
(an in-place or ``out=`` variant: the saved graph is functional, see the torch backend's
``functional``), draws random numbers, or returns nothing (it exists for its effect; only
assertions, which can only raise, are kept) is never loaded, listed or not.
"""

from __future__ import annotations

from typing import Any

import torch

CORE = frozenset("""
    aten::_adaptive_avg_pool2d.default aten::_adaptive_avg_pool2d_backward.default
    aten::_adaptive_avg_pool3d.default aten::_cdist_forward.default aten::_embedding_bag.default
    aten::_fft_c2r.default aten::_fft_r2c.default aten::_local_scalar_dense.default
    aten::_log_softmax.default aten::_native_batch_norm_legit.no_stats
    aten::_native_batch_norm_legit_no_training.default aten::_pdist_forward.default aten::_softmax.default
    aten::_to_copy.default aten::abs.default aten::acos.default aten::acosh.default aten::add.Scalar
    aten::add.Tensor aten::addmm.default aten::alias.default aten::amax.default aten::amin.default
    aten::any.default aten::any.dim aten::any.dims aten::arange.start_step aten::argmax.default
    aten::argmin.default aten::as_strided.default aten::asin.default aten::asinh.default aten::atan.default
    aten::atan2.default aten::atanh.default aten::avg_pool2d.default aten::avg_pool2d_backward.default
    aten::avg_pool3d.default aten::bitwise_and.Scalar aten::bitwise_and.Tensor aten::bitwise_not.default
    aten::bitwise_or.Scalar aten::bitwise_or.Tensor aten::bitwise_xor.Scalar aten::bitwise_xor.Tensor
    aten::bmm.default aten::cat.default aten::ceil.default aten::clamp.Tensor aten::clamp.default
    aten::clone.default aten::col2im.default aten::constant_pad_nd.default aten::convolution.default
    aten::convolution_backward.default aten::copy.default aten::cos.default aten::cosh.default
    aten::cumsum.default aten::diagonal.default aten::div.Scalar aten::div.Scalar_mode aten::div.Tensor
    aten::div.Tensor_mode aten::elu.default aten::embedding.default aten::embedding_dense_backward.default
    aten::eq.Scalar aten::eq.Tensor aten::erf.default
    aten::exp.default aten::expand.default aten::expm1.default aten::fill.Scalar aten::flip.default
    aten::floor.default aten::fmod.Scalar aten::fmod.Tensor aten::full.default aten::full_like.default
    aten::gather.default aten::ge.Scalar aten::ge.Tensor aten::gelu.default aten::grid_sampler_2d.default
    aten::gt.Scalar aten::gt.Tensor aten::hardtanh.default aten::index.Tensor aten::index_put.default
    aten::index_select.default aten::isinf.default aten::isnan.default aten::le.Scalar aten::le.Tensor
    aten::leaky_relu.default aten::log.default aten::log10.default aten::log1p.default aten::log2.default
    aten::logical_and.default aten::logical_not.default aten::logical_or.default aten::logical_xor.default
    aten::lt.Scalar aten::lt.Tensor aten::masked_scatter.default aten::max.dim
    aten::max_pool2d_with_indices.default aten::max_pool2d_with_indices_backward.default
    aten::max_pool3d_with_indices.default aten::maximum.default aten::mean.default aten::mean.dim
    aten::min.dim aten::minimum.default aten::mm.default aten::mul.Scalar aten::mul.Tensor
    aten::native_group_norm.default aten::native_group_norm_backward.default aten::native_layer_norm.default
    aten::native_layer_norm_backward.default aten::ne.Scalar aten::ne.Tensor aten::neg.default
    aten::nonzero.default aten::permute.default aten::pow.Scalar aten::pow.Tensor_Scalar
    aten::pow.Tensor_Tensor aten::prod.default aten::prod.dim_int aten::reciprocal.default
    aten::reflection_pad1d.default aten::reflection_pad2d.default aten::reflection_pad3d.default
    aten::relu.default aten::remainder.Scalar aten::remainder.Tensor aten::repeat.default
    aten::replication_pad2d.default aten::replication_pad3d.default aten::round.default aten::rsqrt.default
    aten::scalar_tensor.default aten::scatter.src aten::scatter.value aten::scatter_add.default
    aten::scatter_reduce.two aten::select.int aten::select_scatter.default aten::sigmoid.default
    aten::sign.default aten::sin.default aten::sinh.default aten::slice.Tensor aten::slice_scatter.default
    aten::sort.default aten::split_with_sizes.default aten::sqrt.default aten::squeeze.dim
    aten::squeeze.dims aten::sub.Scalar aten::sub.Tensor aten::sum.dim_IntList aten::sym_numel.default
    aten::sym_size.int aten::sym_storage_offset.default aten::sym_stride.int aten::tan.default
    aten::tanh.default aten::topk.default aten::trunc.default aten::unsqueeze.default
    aten::upsample_bilinear2d.vec aten::upsample_nearest2d.vec aten::var.correction aten::var.dim
    aten::view.default aten::where.self
""".split())

IR = frozenset("""
    aten::__and__.Tensor aten::_assert_tensor_metadata.default aten::adaptive_avg_pool2d.default
    aten::arange.default aten::arange.start aten::batch_norm.default aten::contiguous.default
    aten::conv1d.default aten::conv2d.default aten::conv_transpose2d.input aten::detach.default
    aten::flatten.using_ints aten::group_norm.default aten::gru.input aten::histc.default aten::layer_norm.default
    aten::linear.default aten::lstm.input aten::matmul.default aten::max_pool2d.default aten::min.other
    aten::new_ones.default aten::pad.default aten::reshape.default
    aten::scaled_dot_product_attention.default aten::silu.default aten::softmax.int aten::split.Tensor
    aten::to.device aten::to.dtype aten::to.dtype_layout aten::transpose.int aten::type_as.default
    aten::unflatten.int aten::where.ScalarOther aten::zeros.default aten::zeros_like.default
    quantized_decomposed::dequantize_per_channel.default quantized_decomposed::dequantize_per_tensor.default
    quantized_decomposed::quantize_per_tensor.default torchkiln::dynamic_linear.default
    torchkiln::grouped_dynamic_mm.default torchkiln::grouped_weight_only_mm.default
    torchkiln::weight_only_linear.default torchkiln::weight_only_linear_zp.default
""".split())

COMMON = frozenset("""
    aten::__or__.Tensor aten::__xor__.Tensor aten::_unsafe_view.default aten::adaptive_avg_pool1d.default
    aten::addbmm.default aten::avg_pool1d.default aten::baddbmm.default aten::celu.default
    aten::channel_shuffle.default aten::chunk.default aten::conv3d.default aten::conv_transpose1d.default
    aten::cross_entropy_loss.default aten::dim.default aten::einsum.default aten::expand_as.default
    aten::floor_divide.default aten::glu.default aten::hardsigmoid.default aten::hardswish.default
    aten::hstack.default aten::instance_norm.default aten::item.default aten::lift_fresh_copy.default
    aten::linalg_vector_norm.default aten::log_softmax.int aten::masked_fill.Scalar aten::masked_fill.Tensor
    aten::masked_select.default aten::max_pool1d.default aten::mish.default aten::nan_to_num.default
    aten::narrow.default aten::new_full.default aten::new_zeros.default
    aten::numel.default aten::ones.default aten::ones_like.default aten::outer.default
    aten::pixel_shuffle.default aten::prelu.default aten::relu6.default aten::repeat_interleave.self_int
    aten::reshape_as.default aten::rms_norm.default aten::roll.default aten::selu.default aten::size.int
    aten::softplus.default aten::square.default aten::stack.default aten::std.correction aten::sum.default
    aten::t.default aten::tensor_split.sections aten::tril.default aten::triu.default aten::unbind.int
    aten::unsafe_split.Tensor aten::upsample_nearest1d.vec aten::view_as.default aten::vstack.default
""".split())

ALLOWED = CORE | IR | COMMON

#: operators tagged random for a dropout that one argument turns off: a saved graph may call them
#: only with that argument at that value (checked per call by :func:`call_refusal`)
RANDOM_UNLESS: dict[str, tuple[str, Any]] = {
    **{f"aten::{rnn}.input": ("train", False) for rnn in ("lstm", "gru", "rnn_tanh", "rnn_relu")},
    "aten::scaled_dot_product_attention.default": ("dropout_p", 0.0),
}


def qualified_name(op: torch._ops.OpOverload) -> str:
    """``namespace::name.overload``, the form the lists and ``program.json`` use."""
    return f"{op.namespace}::{op._schema.name.split('::')[-1]}.{op._overloadname}"


def refusal(op: Any) -> str | None:
    """Why the schema of ``op`` (an ``OpOverload``) rules it out of a saved graph, or None."""
    schema = op._schema
    for value in (*schema.arguments, *schema.returns):
        if value.alias_info is not None and value.alias_info.is_write:
            return f"it writes into its argument '{value.name or 'result'}'"
    if torch.Tag.nondeterministic_seeded in op.tags and qualified_name(op) not in RANDOM_UNLESS:
        return "it draws random numbers"
    if not schema.returns and not schema.name.split("::")[-1].startswith("_assert"):
        return "it returns nothing (it exists for an effect)"
    return None


def call_refusal(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why this call of an allowed ``op`` may not be saved (its dropout is on), or None."""
    name = qualified_name(op)
    if name not in RANDOM_UNLESS:
        return None
    argument, off = RANDOM_UNLESS[name]
    schema = op._schema.arguments
    position = [a.name for a in schema].index(argument)
    value = kwargs.get(argument, args[position] if position < len(args) else schema[position].default_value)
    if type(value) is type(off) and value == off:
        return None
    return f"{name} with {argument}={value!r} draws random numbers (dropout)"


def why_not_allowed(op: Any) -> str | None:
    """None if a saved graph may call ``op``; else why not."""
    if not isinstance(op, torch._ops.OpOverload):
        return "it is not an operator overload"
    name = qualified_name(op)
    if name not in ALLOWED:
        return f"{name} is not on torchkiln's operator allow-list (torchkiln.backends.torch_operators)"
    reason = refusal(op)
    return f"{name}: {reason}" if reason else None


#: the dropout a model in eval mode leaves in a graph before lowering (export keeps it as an operator
#: that passes its input through unless train=True); random, so never in a saved torch artifact
CACHED_DROPOUT = frozenset({"aten::dropout.default", "aten::feature_dropout.default", "aten::alpha_dropout.default",
                            "aten::feature_alpha_dropout.default"})  # fmt: skip


def why_not_cached(op: Any) -> str | None:
    """None if the build cache's stored program (the graph before lowering) may call ``op``: one
    :func:`why_not_allowed` allows, or the in-place form of one (``detach_``, which the export
    frontend leaves: it computes the same thing, into its argument — the cached graph need not be
    functional, only free of operators that do anything but compute), or dropout. Else why not."""
    if not isinstance(op, torch._ops.OpOverload):
        return "it is not an operator overload"
    reason = why_not_allowed(op)
    if reason is None or qualified_name(op) in CACHED_DROPOUT:
        return None
    name = op._schema.name.split("::")[-1]
    if not name.endswith("_") or name.endswith("__"):
        return reason
    functional = getattr(getattr(torch.ops, op.namespace), name[:-1], None)
    overload = getattr(functional, op._overloadname, None) if functional is not None else None
    return reason if overload is None or why_not_allowed(overload) is not None else None
