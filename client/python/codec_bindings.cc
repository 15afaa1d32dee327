// pybind11 bindings of the codec (module mapl._mapl): numpy float32 in and out, the GIL released
// around the math, absl::Status turned into Python exceptions (INVALID_ARGUMENT -> ValueError)
// here, at the language edge. The Python-facing API is client/python/mapl/codec.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <mutex>
#include <shared_mutex>
#include <string>
#include <utility>

#include "absl/types/span.h"
#include "common/check.h"
#include "kernels/backend.h"
#include "kernels/cpu/rvq_distance.h"
#include "kernels/registry.h"

namespace py = pybind11;

namespace mapl {
namespace {

using F32Array = py::array_t<float, py::array::c_style>;

void ThrowIfError(const absl::Status& s) {
  if (s.ok()) return;
  const std::string msg(s.message());
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      throw py::value_error(msg);
    default:
      throw std::runtime_error(absl::StatusCodeToString(s.code()) + ": " + msg);
  }
}

py::array AsArray(const py::handle& obj, const char* what) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::value_error(std::string(what) + ": expected a numpy array, got " +
                          std::string(py::str(obj.get_type().attr("__name__"))));
  }
  return py::reinterpret_borrow<py::array>(obj);
}

void CheckNdim(const py::array& a, const char* what, int ndim) {
  if (a.ndim() != ndim) {
    throw py::value_error(std::string(what) + ": expected a " + std::to_string(ndim) +
                          "-D array, got " + std::to_string(a.ndim()) + "-D");
  }
}

// A C-contiguous float32 array of `ndim` dimensions; other dtypes are an error, not a cast.
template <typename T>
py::array_t<T, py::array::c_style> Typed(const py::handle& obj, const char* what, int ndim) {
  py::array a = AsArray(obj, what);
  if (!a.dtype().equal(py::dtype::of<T>())) {
    throw py::value_error(std::string(what) + ": expected dtype " +
                          std::string(py::str(py::dtype::of<T>())) + ", got " +
                          std::string(py::str(a.dtype())));
  }
  CheckNdim(a, what, ndim);
  return py::array_t<T, py::array::c_style>::ensure(a);
}

ConstTensor View(const F32Array& a) {
  return ConstTensor::F32(a.data(), a.shape(0), a.ndim() > 1 ? a.shape(1) : 1);
}

F32Array NewMatrix(int64_t rows, int64_t cols) { return F32Array({rows, cols}); }
Tensor MutView(F32Array& a) { return Tensor::F32(a.mutable_data(), a.shape(0), a.shape(1)); }

// The codec's backend, from the registry. "cpu" is registered in every build, so failing to make
// it is a broken build, not a user error. Backend methods are const and thread-safe, so one
// instance serves every Python thread.
const Backend& Cpu() {
  static const std::unique_ptr<const Backend> backend = [] {
    absl::StatusOr<std::unique_ptr<Backend>> be = MakeBackend("cpu");
    MAPL_CHECK(be.ok(), be.status().ToString());
    return std::unique_ptr<const Backend>(*std::move(be));
  }();
  return *backend;
}

class PyRvq {
 public:
  PyRvq(int dim, int levels, int codebook_size, uint64_t seed, bool gain_shape) : seed_(seed) {
    RvqCodebooks& cb = learner_.codebooks;
    cb.dim = dim;
    cb.levels = levels;
    cb.codebook_size = codebook_size;
    cb.gain_shape = gain_shape;
    cb.centroids.assign(size_t(std::max(levels, 0)) * std::max(codebook_size, 0) * std::max(dim, 0),
                        0.f);
    ThrowIfError(cb.Validate());
  }

  int dim() const { return learner_.codebooks.dim; }
  int levels() const { return learner_.codebooks.levels; }
  int codebook_size() const { return learner_.codebooks.codebook_size; }
  bool gain_shape() const { return learner_.codebooks.gain_shape; }
  bool fitted() const { return fitted_; }

  void Fit(const py::handle& xo, int iterations, int refine_passes) {
    F32Array x = Typed<float>(xo, "x", 2);
    RvqFitOptions opt;
    opt.levels = levels();
    opt.codebook_size = codebook_size();
    opt.gain_shape = gain_shape();
    opt.kmeans_iterations = iterations;
    opt.refine_passes = refine_passes;
    opt.seed = seed_;
    absl::StatusOr<RvqCodebooks> cb;
    {
      py::gil_scoped_release release;
      cb = Cpu().RvqFit(View(x), opt);
    }
    ThrowIfError(cb.status());
    Replace(RvqLearner::FromCodebooks(*cb, seed_));
  }

  std::pair<py::array, py::object> Encode(const py::handle& xo, int beam) {
    RequireFitted("encode");
    F32Array x = Typed<float>(xo, "x", 2);
    const int64_t n = x.shape(0);
    py::array_t<uint8_t> codes({n, int64_t{levels()}});
    F32Array norms({n});
    absl::Status s;
    {
      py::gil_scoped_release release;
      std::shared_lock lock(mu_);
      s = Cpu().RvqEncode(
          learner_.codebooks, View(x), beam, absl::MakeSpan(codes.mutable_data(), codes.size()),
          gain_shape() ? absl::MakeSpan(norms.mutable_data(), norms.size()) : absl::Span<float>());
    }
    ThrowIfError(s);
    return {codes, gain_shape() ? py::object(norms) : py::none()};
  }

  F32Array Decode(const py::handle& co, const py::object& no) {
    RequireFitted("decode");
    auto codes = Typed<uint8_t>(co, "codes", 2);
    if (codes.shape(1) != levels()) {
      throw py::value_error("codes: expected shape (n, " + std::to_string(levels()) + "), got (" +
                            std::to_string(codes.shape(0)) + ", " + std::to_string(codes.shape(1)) +
                            ")");
    }
    const int64_t n = codes.shape(0);
    F32Array norms;
    if (gain_shape()) {
      if (no.is_none()) throw py::value_error("norms: gain-shape codes need their norms");
      norms = Typed<float>(no, "norms", 1);
      if (norms.shape(0) != n) throw py::value_error("norms: expected one norm per row of codes");
    }
    F32Array out = NewMatrix(n, dim());
    absl::Status s;
    {
      py::gil_scoped_release release;
      std::shared_lock lock(mu_);
      s = Cpu().RvqDecode(learner_.codebooks, absl::MakeConstSpan(codes.data(), codes.size()),
                          gain_shape() ? absl::MakeConstSpan(norms.data(), norms.size())
                                       : absl::Span<const float>(),
                          MutView(out));
    }
    ThrowIfError(s);
    return out;
  }

  py::dict Update(const py::handle& xo, float decay, float dead_fraction) {
    F32Array x = Typed<float>(xo, "x", 2);
    if (!fitted_) {  // docs/METHOD.md section 2: codebooks are initialised from the first batch.
      Fit(xo, 20, 2);
    }
    RvqUpdateOptions opt;
    opt.decay = decay;
    opt.dead_fraction = dead_fraction;
    absl::StatusOr<RvqUpdateStats> st;
    {
      py::gil_scoped_release release;
      std::unique_lock lock(mu_);
      st = Cpu().RvqUpdate(&learner_, View(x), opt);
    }
    ThrowIfError(st.status());
    py::dict d;
    d["relative_mse"] = st->relative_mse;
    d["reseeded"] = st->reseeded;
    return d;
  }

  py::array GetCodebooks() const {
    py::array_t<float> out({int64_t{levels()}, int64_t{codebook_size()}, int64_t{dim()}});
    float* dst = out.mutable_data();
    {
      py::gil_scoped_release release;
      std::shared_lock lock(mu_);
      std::copy(learner_.codebooks.centroids.begin(), learner_.codebooks.centroids.end(), dst);
    }
    return out;
  }

  void SetCodebooks(const py::handle& o) {
    auto a = Typed<float>(o, "codebooks", 3);
    const RvqCodebooks& cur = learner_.codebooks;
    if (a.shape(0) != cur.levels || a.shape(1) != cur.codebook_size || a.shape(2) != cur.dim) {
      throw py::value_error("codebooks: expected shape (" + std::to_string(cur.levels) + ", " +
                            std::to_string(cur.codebook_size) + ", " + std::to_string(cur.dim) +
                            ")");
    }
    RvqCodebooks cb;
    cb.levels = cur.levels;
    cb.codebook_size = cur.codebook_size;
    cb.dim = cur.dim;
    cb.gain_shape = cur.gain_shape;
    cb.centroids.assign(a.data(), a.data() + a.size());
    ThrowIfError(cb.Validate());
    Replace(RvqLearner::FromCodebooks(cb, seed_));
  }

 private:
  void RequireFitted(const char* what) const {
    if (!fitted_) {
      throw py::value_error(std::string("RVQ.") + what +
                            ": the codebooks are not trained yet; call fit(x) or update(x) first");
    }
  }

  // Swaps in new learner state; waits (without the GIL) for encodes in flight on other threads.
  void Replace(RvqLearner next) {
    {
      py::gil_scoped_release release;
      std::unique_lock lock(mu_);
      learner_ = std::move(next);
    }
    fitted_ = true;
  }

  // Python threads may share one RVQ: the GIL is released around the math, so learner_ has its
  // own lock (shared: encode, decode, read; exclusive: fit, update, set). Taken after the GIL is
  // released and dropped before it is re-acquired, so the two never deadlock.
  mutable std::shared_mutex mu_;
  RvqLearner learner_;  // guarded by mu_ (shape fields are immutable after construction)
  const uint64_t seed_;
  bool fitted_ = false;  // written with the GIL held
};

std::pair<py::array, F32Array> Int8Encode(const py::handle& xo) {
  F32Array x = Typed<float>(xo, "x", 2);
  py::array_t<int8_t> q({x.shape(0), x.shape(1)});
  F32Array scales({x.shape(0)});
  absl::Status s;
  {
    py::gil_scoped_release release;
    s = Cpu().Int8Encode(View(x), absl::MakeSpan(q.mutable_data(), q.size()),
                         absl::MakeSpan(scales.mutable_data(), scales.size()));
  }
  ThrowIfError(s);
  return {q, scales};
}

F32Array Int8Decode(const py::handle& qo, const py::handle& so) {
  auto q = Typed<int8_t>(qo, "q", 2);
  F32Array scales = Typed<float>(so, "scales", 1);
  if (scales.shape(0) != q.shape(0)) {
    throw py::value_error("scales: expected " + std::to_string(q.shape(0)) +
                          " scales (one per row of q), got " + std::to_string(scales.shape(0)));
  }
  F32Array out = NewMatrix(q.shape(0), q.shape(1));
  absl::Status s;
  {
    py::gil_scoped_release release;
    s = Cpu().Int8Decode(absl::MakeConstSpan(q.data(), q.size()),
                         absl::MakeConstSpan(scales.data(), scales.size()), MutView(out));
  }
  ThrowIfError(s);
  return out;
}

// Rows of k values pack into ceil(k / 2) bytes (two codes a byte), so q's shape does not say
// whether k is even: the caller gives k.
std::pair<py::array, F32Array> Int4Encode(const py::handle& xo) {
  F32Array x = Typed<float>(xo, "x", 2);
  py::array_t<uint8_t> q({x.shape(0), (x.shape(1) + 1) / 2});
  F32Array scales({x.shape(0)});
  absl::Status s;
  {
    py::gil_scoped_release release;
    s = Cpu().Int4Encode(View(x), absl::MakeSpan(q.mutable_data(), q.size()),
                         absl::MakeSpan(scales.mutable_data(), scales.size()));
  }
  ThrowIfError(s);
  return {q, scales};
}

F32Array Int4Decode(const py::handle& qo, const py::handle& so, int64_t k) {
  auto q = Typed<uint8_t>(qo, "q", 2);
  F32Array scales = Typed<float>(so, "scales", 1);
  if (k < 0 || (k + 1) / 2 != q.shape(1)) {
    throw py::value_error("k: " + std::to_string(k) + " values do not pack into the " +
                          std::to_string(q.shape(1)) + " bytes of a row of q (ceil(k / 2))");
  }
  if (scales.shape(0) != q.shape(0)) {
    throw py::value_error("scales: expected " + std::to_string(q.shape(0)) +
                          " scales (one per row of q), got " + std::to_string(scales.shape(0)));
  }
  F32Array out = NewMatrix(q.shape(0), k);
  absl::Status s;
  {
    py::gil_scoped_release release;
    s = Cpu().Int4Decode(absl::MakeConstSpan(q.data(), q.size()),
                         absl::MakeConstSpan(scales.data(), scales.size()), MutView(out));
  }
  ThrowIfError(s);
  return out;
}

py::array Bf16Encode(const py::handle& xo) {
  F32Array x = Typed<float>(xo, "x", 2);
  ThrowIfError(CheckFinite(View(x), "x"));
  py::array_t<uint16_t> out({x.shape(0), x.shape(1)});
  FloatToBf16(x.data(), out.mutable_data(), static_cast<size_t>(x.size()));
  return out;
}

F32Array Bf16Decode(const py::handle& bo) {
  auto b = Typed<uint16_t>(bo, "b", 2);
  F32Array out = NewMatrix(b.shape(0), b.shape(1));
  Bf16ToFloat(b.data(), out.mutable_data(), static_cast<size_t>(b.size()));
  // Codes come off the wire: NaN or Inf can only be corruption, never a valid activation.
  ThrowIfError(CheckFinite(View(out), "b"));
  return out;
}

F32Array Msign(const py::handle& yo, int max_iterations, float tolerance) {
  F32Array y = Typed<float>(yo, "y", 2);
  F32Array out = NewMatrix(y.shape(0), y.shape(1));
  MsignOptions opt;
  opt.max_iterations = max_iterations;
  opt.tolerance = tolerance;
  absl::Status s;
  {
    py::gil_scoped_release release;
    s = Cpu().Msign(View(y), MutView(out), opt);
  }
  ThrowIfError(s);
  return out;
}

F32Array Retract(const py::handle& uo) {
  F32Array u = Typed<float>(uo, "u", 2);
  F32Array out = NewMatrix(u.shape(0), u.shape(1));
  std::copy(u.data(), u.data() + u.size(), out.mutable_data());
  absl::Status s;
  {
    py::gil_scoped_release release;
    s = Cpu().Retract(MutView(out));
  }
  ThrowIfError(s);
  return out;
}

std::pair<F32Array, F32Array> SpelStep(const py::handle& uo, const py::handle& go,
                                       const py::handle& mo, float lr, float beta) {
  F32Array u = Typed<float>(uo, "u", 2);
  F32Array g = Typed<float>(go, "grad", 2);
  F32Array m = Typed<float>(mo, "momentum", 2);
  F32Array u2 = NewMatrix(u.shape(0), u.shape(1));
  F32Array m2 = NewMatrix(m.shape(0), m.shape(1));
  std::copy(u.data(), u.data() + u.size(), u2.mutable_data());
  std::copy(m.data(), m.data() + m.size(), m2.mutable_data());
  SpelOptions opt;
  opt.lr = lr;
  opt.beta = beta;
  absl::Status s;
  {
    py::gil_scoped_release release;
    s = Cpu().SpelStep(MutView(u2), View(g), MutView(m2), opt);
  }
  ThrowIfError(s);
  return {u2, m2};
}

F32Array Project(const py::handle& ho, const py::handle& uo) {
  F32Array h = Typed<float>(ho, "h", 2);
  F32Array u = Typed<float>(uo, "u", 2);
  F32Array z = NewMatrix(h.shape(0), u.shape(1));
  absl::Status s;
  {
    py::gil_scoped_release release;
    s = Cpu().Project(View(h), View(u), MutView(z));
  }
  ThrowIfError(s);
  return z;
}

F32Array Lift(const py::handle& zo, const py::handle& uo) {
  F32Array z = Typed<float>(zo, "z", 2);
  F32Array u = Typed<float>(uo, "u", 2);
  F32Array h = NewMatrix(z.shape(0), u.shape(0));
  absl::Status s;
  {
    py::gil_scoped_release release;
    s = Cpu().Lift(View(z), View(u), MutView(h));
  }
  ThrowIfError(s);
  return h;
}

}  // namespace
}  // namespace mapl

PYBIND11_MODULE(_mapl, m) {
  using mapl::PyRvq;
  m.doc() = "mapl native codec (see mapl.codec)";
  py::class_<PyRvq>(m, "Rvq")
      .def(py::init<int, int, int, uint64_t, bool>())
      .def_property_readonly("dim", &PyRvq::dim)
      .def_property_readonly("levels", &PyRvq::levels)
      .def_property_readonly("codebook_size", &PyRvq::codebook_size)
      .def_property_readonly("gain_shape", &PyRvq::gain_shape)
      .def_property_readonly("fitted", &PyRvq::fitted)
      .def("fit", &PyRvq::Fit)
      .def("encode", &PyRvq::Encode)
      .def("decode", &PyRvq::Decode)
      .def("update", &PyRvq::Update)
      .def("get_codebooks", &PyRvq::GetCodebooks)
      .def("set_codebooks", &PyRvq::SetCodebooks);
  m.def("int8_encode", &mapl::Int8Encode);
  m.def("int8_decode", &mapl::Int8Decode);
  m.def("int4_encode", &mapl::Int4Encode);
  m.def("int4_decode", &mapl::Int4Decode);
  m.def("bf16_encode", &mapl::Bf16Encode);
  m.def("bf16_decode", &mapl::Bf16Decode);
  m.def("msign", &mapl::Msign);
  m.def("retract", &mapl::Retract);
  m.def("spel_step", &mapl::SpelStep);
  m.def("project", &mapl::Project);
  m.def("lift", &mapl::Lift);
  m.def("distance_kernel", [] {
    return std::string(mapl::cpu::DistanceKernelName(mapl::cpu::DistanceKernel::kAuto));
  });
}
