// pybind11 bindings of the local-API client (module mapl._client). The Python-facing API is
// client/python/mapl/sidecar.py; this layer stays thin: plain tuples and dicts in and out, the GIL
// released around every call that waits on the daemon, and each mapl::client::Status turned into
// the matching mapl.errors exception here, at the language edge. Step and Stats return the
// daemon's reply records as dicts by protobuf reflection (proto_dict.h): no per-field code, so a
// statistic added to local.proto reaches Python unchanged.
//
// Shared memory reaches Python as Region objects, which export a writable byte buffer (the buffer
// protocol) and hold the Client, so memory that torch.frombuffer wraps stays mapped as long as any
// tensor uses it, even after the session is closed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "client/mapl_client.h"
#include "client/python/proto_dict.h"

namespace py = pybind11;

namespace mapl {
namespace client {
namespace {

void ThrowIfError(const Status& s) {
  if (s.ok()) return;
  py::object err = py::module_::import("mapl.errors").attr("error_from_status")(s.code, s.message);
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
  throw py::error_already_set();
}

DType ToDType(int v) {
  if (v != static_cast<int>(DType::kF32) && v != static_cast<int>(DType::kBF16) &&
      v != static_cast<int>(DType::kI32)) {
    throw py::value_error("unknown mapl dtype code " + std::to_string(v));
  }
  return static_cast<DType>(v);
}

Direction ToDirection(int v) {
  if (v != static_cast<int>(Direction::kForward) && v != static_cast<int>(Direction::kBackward)) {
    throw py::value_error("unknown mapl direction code " + std::to_string(v));
  }
  return static_cast<Direction>(v);
}

Memory ToMemory(int v) {
  if (v != static_cast<int>(Memory::kHost) && v != static_cast<int>(Memory::kCuda)) {
    throw py::value_error("unknown mapl memory code " + std::to_string(v) + " (0 host, 1 CUDA)");
  }
  return static_cast<Memory>(v);
}

// A TensorRef as Python passes it: (buffer, offset, rows, cols, dtype) for host memory, or
// (buffer, offset, rows, cols, dtype, memory, event).
TensorRef ToRef(const py::sequence& t) {
  if (t.size() != 5 && t.size() != 7) {
    throw py::type_error(
        "a tensor ref is (buffer, offset, rows, cols, dtype) or (buffer, "
        "offset, rows, cols, dtype, memory, event), got " +
        std::to_string(t.size()) + " items");
  }
  try {
    TensorRef r{t[0].cast<uint32_t>(), t[1].cast<uint64_t>(), t[2].cast<uint32_t>(),
                t[3].cast<uint32_t>(), ToDType(t[4].cast<int>())};
    if (t.size() == 7) {
      r.memory = ToMemory(t[5].cast<int>());
      r.event = t[6].cast<uint32_t>();
    }
    return r;
  } catch (const py::cast_error&) {
    throw py::type_error("a tensor ref holds non-negative integers, got " +
                         std::string(py::repr(t)));
  }
}

// A byte range of one mapped buffer, exported through the buffer protocol.
struct Region {
  std::shared_ptr<Client> owner;  // Keeps the mapping alive.
  uint32_t buffer;
  uint64_t offset;
  uint64_t bytes;
  char* ptr;
};

// Bytes of buffer i; IndexError when there is no such buffer.
size_t CheckedBytes(const Client& c, uint32_t i) {
  if (i >= c.buffer_count()) {
    throw py::index_error("buffer " + std::to_string(i) + " out of range: " +
                          std::to_string(c.buffer_count()) + " buffers attached");
  }
  return c.bytes(i);
}

Region MakeRegion(const std::shared_ptr<Client>& c, uint32_t buffer, uint64_t offset,
                  uint64_t bytes) {
  const uint64_t size = CheckedBytes(*c, buffer);
  if (offset > size || bytes > size - offset) {
    throw py::index_error("region [" + std::to_string(offset) + ", +" + std::to_string(bytes) +
                          ") exceeds buffer " + std::to_string(buffer) + " of " +
                          std::to_string(size) + " bytes");
  }
  return Region{c, buffer, offset, bytes, static_cast<char*>(c->data(buffer)) + offset};
}

std::shared_ptr<Client> Connect(const std::string& socket_path, const std::string& name,
                                uint32_t timeout_ms, uint32_t cuda_buffers,
                                uint64_t cuda_buffer_bytes, uint32_t cuda_events,
                                const std::string& cuda_device_uuid) {
  ConnectOptions options;
  options.cuda_buffers = cuda_buffers;
  options.cuda_buffer_bytes = cuda_buffer_bytes;
  options.cuda_events = cuda_events;
  options.cuda_device_uuid = cuda_device_uuid;
  std::unique_ptr<Client> c;
  Status s;
  {
    py::gil_scoped_release nogil;
    s = Client::Connect(socket_path, name, timeout_ms, options, &c);
  }
  ThrowIfError(s);
  return std::shared_ptr<Client>(std::move(c));
}

void BindModule(py::module_& m) {
  m.doc() = "mapl local-API client (C++ binding); use mapl.Sidecar";

  py::class_<Region>(m, "Region", py::buffer_protocol())
      .def_readonly("buffer", &Region::buffer)
      .def_readonly("offset", &Region::offset)
      .def_readonly("nbytes", &Region::bytes)
      .def_property_readonly("address",
                             [](const Region& r) { return reinterpret_cast<uintptr_t>(r.ptr); })
      .def_buffer([](Region& r) {
        return py::buffer_info(r.ptr, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(r.bytes)}, {py::ssize_t{1}},
                               /*readonly=*/false);
      });

  py::class_<Client, std::shared_ptr<Client>>(m, "Client")
      .def_static("connect", &Connect, py::arg("socket_path"), py::arg("name"),
                  py::arg("timeout_ms"), py::arg("cuda_buffers") = 0,
                  py::arg("cuda_buffer_bytes") = 0, py::arg("cuda_events") = 0,
                  py::arg("cuda_device_uuid") = py::bytes(),
                  "Attach to the mapld on unix:socket_path and map its buffers; cuda_buffers > 0 "
                  "also asks for device buffers and events (see cuda()).")
      .def(
          "cuda",
          [](const Client& c) -> py::object {
            const ::mapl::v1::CudaBuffers* cuda = c.cuda();
            if (cuda == nullptr) return py::none();
            py::list memory, events;
            for (const std::string& h : cuda->memory_handles()) memory.append(py::bytes(h));
            for (const std::string& h : cuda->event_handles()) events.append(py::bytes(h));
            py::dict d;
            d["device_uuid"] = py::bytes(cuda->device_uuid());
            d["memory_handles"] = memory;
            d["buffer_bytes"] = cuda->buffer_bytes();
            d["event_handles"] = events;
            return std::move(d);
          },
          "A CUDA session's device buffers as mapld handed them out: {device_uuid, "
          "memory_handles (cudaIpcMemHandle_t bytes), buffer_bytes, event_handles "
          "(cudaIpcEventHandle_t bytes)}; None for a host-only session.")
      .def_property_readonly("socket_path", &Client::socket_path)
      .def_property_readonly("session", &Client::session)
      .def_property_readonly("stage", &Client::stage)
      .def_property_readonly("attached", &Client::attached)
      .def("attach_status",
           [](const Client& c) {
             Status s = c.AttachStatus();
             return std::make_tuple(s.code, s.message);
           })
      .def("boundaries",
           [](const Client& c) {
             py::list out;
             for (const BoundaryInfo& b : c.boundaries()) {
               py::dict d;
               d["id"] = b.id;
               d["role"] = b.role;
               d["d"] = b.d;
               d["k"] = b.k;
               d["method"] = b.method;
               d["vocab"] = b.vocab;
               d["max_tokens"] = b.max_tokens;
               out.append(d);
             }
             return out;
           })
      .def_property_readonly("buffer_count", &Client::buffer_count)
      .def("buffer_bytes", [](const Client& c, uint32_t i) { return CheckedBytes(c, i); })
      .def("buffer_address",
           [](const Client& c, uint32_t i) {
             CheckedBytes(c, i);
             return reinterpret_cast<uintptr_t>(c.data(i));
           })
      .def("buffer_name",
           [](const Client& c, uint32_t i) {
             CheckedBytes(c, i);
             return c.buffer_name(i);
           })
      .def("region", &MakeRegion, py::arg("buffer"), py::arg("offset"), py::arg("nbytes"),
           "A writable byte view of [offset, offset + nbytes) of a buffer.")
      .def(
          "send",
          [](Client& c, uint32_t boundary, int direction, uint64_t step, uint32_t microbatch,
             const py::sequence& tensor_ref, const std::optional<py::sequence>& ids_ref, bool wait,
             const std::vector<uint32_t>& shape, bool evaluation) {
            const TensorRef t = ToRef(tensor_ref);
            std::optional<TensorRef> ids;
            if (ids_ref.has_value()) ids = ToRef(*ids_ref);
            const Direction dir = ToDirection(direction);
            SendOptions options;
            options.wait_encoded = wait;
            options.shape = shape;
            options.evaluation = evaluation;
            SendResult r;
            Status s;
            {
              py::gil_scoped_release nogil;
              s = c.Send(boundary, dir, step, microbatch, t, ids, options, &r);
            }
            ThrowIfError(s);
            return std::make_tuple(r.wire_bytes, r.raw_bytes);
          },
          py::arg("boundary"), py::arg("direction"), py::arg("step"), py::arg("microbatch"),
          py::arg("tensor_ref"), py::arg("ids_ref") = py::none(), py::arg("wait") = false,
          py::arg("shape") = std::vector<uint32_t>(), py::arg("evaluation") = false,
          "Hands a tensor to mapld; returns (wire_bytes, raw_bytes). Refs are (buffer, offset, "
          "rows, cols, dtype) or, for device memory, (buffer, offset, rows, cols, dtype, memory, "
          "event); ids are host memory. shape: the tensor's shape as the trainer holds it (last "
          "dimension d); evaluation: it trains nothing.")
      .def(
          "recv",
          [](Client& c, uint32_t boundary, int direction, uint64_t step, uint32_t microbatch,
             const py::sequence& into_ref, uint32_t timeout_ms,
             const std::optional<py::sequence>& ids_ref,
             const std::vector<uint32_t>& expect_shape) {
            const TensorRef t = ToRef(into_ref);
            const Direction dir = ToDirection(direction);
            RecvOptions options;
            if (ids_ref.has_value()) options.token_ids = ToRef(*ids_ref);
            options.expect_shape = expect_shape;
            RecvResult r;
            Status s;
            {
              py::gil_scoped_release nogil;
              s = c.Recv(boundary, dir, step, microbatch, t, timeout_ms, options, &r);
            }
            ThrowIfError(s);
            py::list shape;
            for (uint32_t v : r.shape) shape.append(v);
            const int dtype = r.dtype.has_value() ? static_cast<int>(*r.dtype) : 0;
            return py::make_tuple(r.rows, r.cols, shape, dtype, r.has_token_ids);
          },
          py::arg("boundary"), py::arg("direction"), py::arg("step"), py::arg("microbatch"),
          py::arg("into_ref"), py::arg("timeout_ms"), py::arg("ids_ref") = py::none(),
          py::arg("expect_shape") = std::vector<uint32_t>(),
          "Receives a tensor into into_ref (and its token ids into ids_ref, (capacity, 1) I32); "
          "returns (rows, cols, shape, dtype_code, has_token_ids). dtype_code: 1 F32, 2 BF16 as "
          "sent, 0 when the frame did not say.")
      .def(
          "step",
          [](Client& c, uint64_t step, uint32_t timeout_ms) {
            StepResult r;
            Status s;
            {
              py::gil_scoped_release nogil;
              s = c.Step(step, timeout_ms, &r);
            }
            ThrowIfError(s);
            return MessageToDict(r);  // {"boundaries": [record, ...]}
          },
          py::arg("step"), py::arg("timeout_ms"))
      .def("stats",
           [](Client& c) {
             StatsResult r;
             Status s;
             {
               py::gil_scoped_release nogil;
               s = c.Stats(&r);
             }
             ThrowIfError(s);
             return MessageToDict(r);  // {"stage": ..., "boundaries": [record, ...]}
           })
      .def("checkpoint",
           [](Client& c) {
             CheckpointResult r;
             Status s;
             {
               py::gil_scoped_release nogil;
               s = c.Checkpoint(&r);
             }
             ThrowIfError(s);
             return MessageToDict(r);  // {"boundaries": [{"boundary", "path", ...}, ...]}
           })
      .def("close", [](Client& c) {
        py::gil_scoped_release nogil;
        c.Close();
      });
}

}  // namespace
}  // namespace client
}  // namespace mapl

PYBIND11_MODULE(_client, m) { mapl::client::BindModule(m); }
