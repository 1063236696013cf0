// Direct calls of the llamalab ops from Python, for the eager forward (llamalab.kernels.OPS).
//
// A call of torch.ops.llamalab.<op> from Python goes through torch's boxed path: the arguments are parsed
// against the schema into IValues, then unboxed again for the kernel — 3-6 us a call on the machines this
// was measured on, against ~1 us for a pybind11 function, and an eager decode step makes ~12 such calls per
// layer. This module (Python name _llamalab_direct, built into the same library as the kernels where the
// Python headers are found) binds each op once as a typed dispatcher handle and calls it unboxed: the same
// dispatcher, schema, kernel and profiler records as torch.ops, without the boxing. The GIL is released
// for the call, as torch.ops does, so a server's other threads run while a kernel does.
//
// torch.compile keeps calling torch.ops (the graph needs the registered op and its fake); only eager calls
// come here.
#include <torch/extension.h>

#include <tuple>
#include <vector>

namespace {

using CT = const at::Tensor&;
using TV = const std::vector<at::Tensor>&;

template <class Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace

PYBIND11_MODULE(_llamalab_direct, m) {
  namespace py = pybind11;
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  static const auto q8_0 = handle<at::Tensor(CT, CT, CT)>("llamalab::q8_0_linear");
  static const auto q4_0 = handle<at::Tensor(CT, CT, CT)>("llamalab::q4_0_linear");
  static const auto q4_1 = handle<at::Tensor(CT, CT, CT, CT)>("llamalab::q4_1_linear");
  static const auto linears =
      handle<std::vector<at::Tensor>(CT, at::TensorList, at::TensorList, at::TensorList, int64_t)>(
          "llamalab::block_linears");
  static const auto swiglu =
      handle<at::Tensor(CT, at::TensorList, at::TensorList, at::TensorList, int64_t)>("llamalab::block_swiglu");
  static const auto q4_k = handle<at::Tensor(CT, CT)>("llamalab::q4_k_linear");
  static const auto q6_k = handle<at::Tensor(CT, CT)>("llamalab::q6_k_linear");
  static const auto dense = handle<at::Tensor(CT, CT, const c10::optional<at::Tensor>&)>("llamalab::dense_linear");
  static const auto dense_many = handle<std::vector<at::Tensor>(CT, at::TensorList)>("llamalab::dense_linears");
  static const auto dense_glu = handle<at::Tensor(CT, at::TensorList)>("llamalab::dense_swiglu");
  static const auto rms = handle<at::Tensor(CT, CT, double)>("llamalab::rms_norm");
  static const auto add_rms = handle<std::tuple<at::Tensor, at::Tensor>(CT, CT, CT, double)>("llamalab::add_rms_norm");
  static const auto silu = handle<at::Tensor(CT, CT)>("llamalab::silu_mul");
  static const auto attn =
      handle<at::Tensor(CT, CT, CT, CT, CT, CT, CT, int64_t, int64_t)>("llamalab::decode_attention");
  static const auto attn_rows =
      handle<at::Tensor(CT, CT, CT, CT, CT, CT, CT, CT, CT)>("llamalab::decode_attention_rows");

  m.def("q8_0_linear", [](CT x, CT qs, CT d) { return q8_0.call(x, qs, d); }, nogil);
  m.def("q4_0_linear", [](CT x, CT qs, CT d) { return q4_0.call(x, qs, d); }, nogil);
  m.def("q4_1_linear", [](CT x, CT qs, CT d, CT mn) { return q4_1.call(x, qs, d, mn); }, nogil);
  m.def("block_linears", [](CT x, TV qs, TV d, TV mn, int64_t kind) { return linears.call(x, qs, d, mn, kind); },
        nogil);
  m.def("block_swiglu", [](CT x, TV qs, TV d, TV mn, int64_t kind) { return swiglu.call(x, qs, d, mn, kind); },
        nogil);
  m.def("q4_k_linear", [](CT x, CT kq) { return q4_k.call(x, kq); }, nogil);
  m.def("q6_k_linear", [](CT x, CT kq) { return q6_k.call(x, kq); }, nogil);
  m.def("dense_linear", [](CT x, CT w, const c10::optional<at::Tensor>& b) { return dense.call(x, w, b); },
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), nogil);
  m.def("dense_linears", [](CT x, TV ws) { return dense_many.call(x, ws); }, nogil);
  m.def("dense_swiglu", [](CT x, TV ws) { return dense_glu.call(x, ws); }, nogil);
  m.def("rms_norm", [](CT x, CT w, double eps) { return rms.call(x, w, eps); }, nogil);
  m.def("add_rms_norm", [](CT x, CT r, CT w, double eps) { return add_rms.call(x, r, w, eps); }, nogil);
  m.def("silu_mul", [](CT g, CT u) { return silu.call(g, u); }, nogil);
  m.def("decode_attention",
        [](CT q, CT k, CT v, CT cos, CT sin, CT ck, CT cv, int64_t row0, int64_t start) {
          return attn.call(q, k, v, cos, sin, ck, cv, row0, start);
        },
        nogil);
  m.def("decode_attention_rows",
        [](CT q, CT k, CT v, CT cos, CT sin, CT ck, CT cv, CT rows, CT slots) {
          return attn_rows.call(q, k, v, cos, sin, ck, cv, rows, slots);
        },
        nogil);
}
