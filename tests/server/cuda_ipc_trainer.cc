// A GPU trainer of one stage for the CUDA IPC tests and benchmark (cuda_ipc_test,
// bench/cuda_ipc_bench): it attaches to its mapld with device buffers, opens their IPC handles
// in its own CUDA context, and hands tensors over in device memory, as a PyTorch trainer does
// through mapl's Python client. It must be its own process: CUDA cannot open an IPC handle in the
// process that exported it.
//
//   cuda_ipc_trainer --socket=S --role=up|down --rows=N --d=D --steps=K      (check)
//   cuda_ipc_trainer --socket=S --role=up|down --rows=N --d=D --repeat=M --time
//
// Check: for each step the upstream writes a bf16 pattern into a device buffer on its stream,
// behind a host callback that holds the stream for 20 ms, records an event and sends without
// synchronizing; the downstream receives into a device buffer, makes its stream wait on the
// daemon's event, and compares, then sends another pattern back, which the upstream checks.
// Step 2 uses no events (each side synchronizes itself). The patterns are exact in bf16, and the
// boundary is METHOD_DENSE (bf16 on the wire), so every value must arrive unchanged.
//
// Time: the upstream sends M tensors from shared host memory and M from device memory,
// alternating; the downstream, once all have arrived, receives them alternately into host and
// device memory. Each side prints logfmt lines with the median per call of each, and the median
// of a plain cudaMemcpy of the same bytes in the direction the daemon copies them (the copy the
// device path adds: device to host for a Send, host to device for a Recv).
//
// Exit status 0 when every check passed; 1 with a line saying what differed otherwise.
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "client/mapl_client.h"

namespace mc = mapl::client;

namespace {

struct Args {
  std::string socket;
  bool up = true;
  uint32_t rows = 64;
  uint32_t d = 256;
  uint32_t steps = 2;
  uint32_t repeat = 50;
  bool time = false;
};

[[noreturn]] void Fail(const std::string& what) {
  std::fprintf(stderr, "cuda_ipc_trainer: %s\n", what.c_str());
  std::fflush(stderr);
  std::_Exit(1);
}

void Check(cudaError_t err, const char* call) {
  if (err != cudaSuccess) {
    Fail(
        absl::StrCat(call, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
  }
}
#define CUDA_CHECK(call) Check((call), #call)

void Check(const mc::Status& s, const std::string& call) {
  if (!s.ok()) Fail(absl::StrCat(call, ": ", mc::StatusCodeName(s.code), ": ", s.message));
}

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&arg](const char* name) -> const char* {
      return absl::StartsWith(arg, name) ? arg.c_str() + std::strlen(name) : nullptr;
    };
    if (const char* v = value("--socket=")) {
      a.socket = v;
    } else if (const char* v = value("--role=")) {
      a.up = std::string(v) == "up";
    } else if (const char* v = value("--rows=")) {
      if (!absl::SimpleAtoi(v, &a.rows)) Fail("--rows: not a number");
    } else if (const char* v = value("--d=")) {
      if (!absl::SimpleAtoi(v, &a.d)) Fail("--d: not a number");
    } else if (const char* v = value("--steps=")) {
      if (!absl::SimpleAtoi(v, &a.steps)) Fail("--steps: not a number");
    } else if (const char* v = value("--repeat=")) {
      if (!absl::SimpleAtoi(v, &a.repeat)) Fail("--repeat: not a number");
    } else if (arg == "--time") {
      a.time = true;
    } else {
      Fail("unknown argument " + arg);
    }
  }
  if (a.socket.empty()) Fail("--socket is required");
  return a;
}

// bf16 bits of pattern `seed` at element i: multiples of 1/64 in [-125/64, 125/64], exact in
// bf16 (and in the f32 the daemon computes in).
uint16_t PatternAt(uint64_t i, uint32_t seed) {
  const float v = static_cast<float>(static_cast<int>((i * 7 + seed * 13) % 251) - 125) / 64.0f;
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return static_cast<uint16_t>(bits >> 16);
}

std::vector<uint16_t> Pattern(uint64_t n, uint32_t seed) {
  std::vector<uint16_t> p(n);
  for (uint64_t i = 0; i < n; ++i) p[i] = PatternAt(i, seed);
  return p;
}

void HoldStream(void*) { ::usleep(20000); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

double Micros(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - since)
      .count();
}

class Trainer {
 public:
  explicit Trainer(const Args& a) : a_(a) {
    const uint64_t bytes = Bytes();
    mc::ConnectOptions options;
    options.cuda_buffers = 2;
    options.cuda_buffer_bytes = bytes;
    options.cuda_events = 4;
    Check(mc::Client::Connect(a.socket, a.up ? "cuda-up" : "cuda-down", 30000, options, &client_),
          "Connect");
    const mapl::v1::CudaBuffers* cuda = client_->cuda();
    if (cuda == nullptr) Fail("Connect gave no device buffers");
    // The device the daemon allocated on, by UUID (device numbers depend on CUDA_VISIBLE_DEVICES).
    int count = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count));
    int device = -1;
    for (int i = 0; i < count && device < 0; ++i) {
      cudaDeviceProp prop;
      CUDA_CHECK(cudaGetDeviceProperties(&prop, i));
      if (std::memcmp(prop.uuid.bytes, cuda->device_uuid().data(), 16) == 0) device = i;
    }
    if (device < 0) Fail("no visible device has the daemon's device UUID");
    CUDA_CHECK(cudaSetDevice(device));
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    for (const std::string& h : cuda->memory_handles()) {
      cudaIpcMemHandle_t handle;
      std::memcpy(&handle, h.data(), sizeof(handle));
      void* p = nullptr;
      CUDA_CHECK(cudaIpcOpenMemHandle(&p, handle, cudaIpcMemLazyEnablePeerAccess));
      buffers_.push_back(static_cast<char*>(p));
    }
    for (const std::string& h : cuda->event_handles()) {
      cudaIpcEventHandle_t handle;
      std::memcpy(&handle, h.data(), sizeof(handle));
      cudaEvent_t e = nullptr;
      CUDA_CHECK(cudaIpcOpenEventHandle(&e, handle));
      events_.push_back(e);
    }
    CUDA_CHECK(cudaMallocHost(&pinned_, bytes));
  }

  ~Trainer() {
    cudaStreamSynchronize(stream_);
    for (char* p : buffers_) cudaIpcCloseMemHandle(p);
    cudaFreeHost(pinned_);
    cudaStreamDestroy(stream_);
  }

  uint64_t Bytes() const { return uint64_t{a_.rows} * a_.d * 2; }
  mc::Direction Out() const { return a_.up ? mc::Direction::kForward : mc::Direction::kBackward; }
  mc::Direction In() const { return a_.up ? mc::Direction::kBackward : mc::Direction::kForward; }

  mc::TensorRef Device(uint32_t buffer, uint32_t event) const {
    return mc::TensorRef{buffer, 0, a_.rows, a_.d, mc::DType::kBF16, mc::Memory::kCuda, event};
  }

  // Writes pattern `seed` into device buffer 0 on the stream (behind a 20 ms hold when `hold`),
  // and sends it; with `event` the stream is not synchronized first.
  void SendPattern(uint64_t step, uint32_t seed, bool use_event) {
    const std::vector<uint16_t> p = Pattern(uint64_t{a_.rows} * a_.d, seed);
    std::memcpy(pinned_, p.data(), Bytes());
    CUDA_CHECK(cudaLaunchHostFunc(stream_, HoldStream, nullptr));
    CUDA_CHECK(cudaMemcpyAsync(buffers_[0], pinned_, Bytes(), cudaMemcpyHostToDevice, stream_));
    if (use_event) {
      CUDA_CHECK(cudaEventRecord(events_[0], stream_));
    } else {
      CUDA_CHECK(cudaStreamSynchronize(stream_));
    }
    mc::SendResult sent;
    Check(client_->Send(0, Out(), step, 0, Device(0, use_event ? 1 : 0), std::nullopt, &sent),
          absl::StrCat("Send step ", step));
  }

  // Receives into device buffer 1 and compares with pattern `seed`.
  void ExpectPattern(uint64_t step, uint32_t seed, bool use_event) {
    mc::RecvResult got;
    Check(client_->Recv(0, In(), step, 0, Device(1, use_event ? 2 : 0), 30000, &got),
          absl::StrCat("Recv step ", step));
    if (got.rows != a_.rows) Fail(absl::StrCat("step ", step, ": ", got.rows, " rows"));
    if (use_event) CUDA_CHECK(cudaStreamWaitEvent(stream_, events_[1], 0));
    CUDA_CHECK(cudaMemcpyAsync(pinned_, buffers_[1], Bytes(), cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    const uint16_t* h = static_cast<const uint16_t*>(pinned_);
    for (uint64_t i = 0; i < uint64_t{a_.rows} * a_.d; ++i) {
      if (h[i] != PatternAt(i, seed)) {
        Fail(absl::StrCat("step ", step, (use_event ? " (events)" : " (no events)"), ": element ",
                          i, " is 0x", absl::Hex(h[i]), ", sent 0x",
                          absl::Hex(PatternAt(i, seed))));
      }
    }
  }

  void RunCheck() {
    for (uint32_t step = 1; step <= a_.steps; ++step) {
      const bool events = step % 2 == 1;
      if (a_.up) {
        SendPattern(step, 2 * step, events);
        ExpectPattern(step, 2 * step + 1, events);
      } else {
        ExpectPattern(step, 2 * step, events);
        SendPattern(step, 2 * step + 1, events);
      }
      mc::StepResult stepped;
      Check(client_->Step(step, 30000, &stepped), absl::StrCat("Step ", step));
    }
    std::printf("role=%s steps=%u rows=%u d=%u result=ok\n", a_.up ? "up" : "down", a_.steps,
                a_.rows, a_.d);
  }

  // Host memory of the same tensor: the first host buffer, as a CPU trainer uses it.
  mc::TensorRef Host() const {
    return mc::TensorRef{0, 0, a_.rows, a_.d, mc::DType::kBF16, mc::Memory::kHost, 0};
  }

  // The copy the daemon adds to this side's device call, between page-locked host memory and a
  // device buffer: device to host for a Send, host to device for a Recv.
  double CopyMedian() {
    std::vector<double> t;
    for (uint32_t i = 0; i < 20; ++i) {
      const auto start = std::chrono::steady_clock::now();
      if (a_.up) {
        CUDA_CHECK(cudaMemcpyAsync(pinned_, buffers_[0], Bytes(), cudaMemcpyDeviceToHost, stream_));
      } else {
        CUDA_CHECK(cudaMemcpyAsync(buffers_[1], pinned_, Bytes(), cudaMemcpyHostToDevice, stream_));
      }
      CUDA_CHECK(cudaStreamSynchronize(stream_));
      t.push_back(Micros(start));
    }
    return Median(t);
  }

  void RunTime() {
    if (client_->bytes(0) < Bytes()) Fail("the host buffers are smaller than the tensor");
    const std::vector<uint16_t> p = Pattern(uint64_t{a_.rows} * a_.d, 1);
    std::memcpy(client_->data(0), p.data(), Bytes());
    std::memcpy(pinned_, p.data(), Bytes());
    CUDA_CHECK(cudaMemcpy(buffers_[0], pinned_, Bytes(), cudaMemcpyHostToDevice));
    std::vector<double> host, device;
    if (a_.up) {
      for (uint32_t i = 0; i < a_.repeat; ++i) {
        mc::SendResult sent;
        auto start = std::chrono::steady_clock::now();
        Check(client_->Send(0, Out(), 1, 2 * i, Host(), std::nullopt, &sent), "Send host");
        host.push_back(Micros(start));
        // The event is recorded on an idle stream: what is timed is the hand-off itself.
        CUDA_CHECK(cudaEventRecord(events_[0], stream_));
        start = std::chrono::steady_clock::now();
        Check(client_->Send(0, Out(), 1, 2 * i + 1, Device(0, 1), std::nullopt, &sent),
              "Send device");
        device.push_back(Micros(start));
      }
    } else {
      // Every tensor decoded and waiting first: Recv then times the hand-off, not the wire.
      for (int tries = 0;; ++tries) {
        mc::StatsResult st;
        Check(client_->Stats(&st), "Stats");
        if (st.boundaries_size() > 0 && st.boundaries(0).frames_received() >= 2 * a_.repeat) break;
        if (tries == 1200) Fail("the upstream's tensors did not all arrive within 60 s");
        ::usleep(50000);
      }
      for (uint32_t i = 0; i < a_.repeat; ++i) {
        mc::RecvResult got;
        auto start = std::chrono::steady_clock::now();
        Check(client_->Recv(0, In(), 1, 2 * i, Host(), 30000, &got), "Recv host");
        host.push_back(Micros(start));
        start = std::chrono::steady_clock::now();
        Check(client_->Recv(0, In(), 1, 2 * i + 1, Device(1, 2), 30000, &got), "Recv device");
        CUDA_CHECK(cudaStreamWaitEvent(stream_, events_[1], 0));
        CUDA_CHECK(cudaStreamSynchronize(stream_));  // the tensor is usable on the device now
        device.push_back(Micros(start));
      }
    }
    const double copy = CopyMedian();
    const double h = Median(host), dev = Median(device);
    std::printf(
        "role=%s call=%s rows=%u d=%u bytes=%llu repeat=%u host_us=%.1f device_us=%.1f "
        "copy_us=%.1f handoff_extra_us=%.1f\n",
        a_.up ? "up" : "down", a_.up ? "send" : "recv", a_.rows, a_.d,
        static_cast<unsigned long long>(Bytes()), a_.repeat, h, dev, copy, dev - h - copy);
  }

 private:
  const Args a_;
  std::unique_ptr<mc::Client> client_;
  cudaStream_t stream_ = nullptr;
  std::vector<char*> buffers_;
  std::vector<cudaEvent_t> events_;
  void* pinned_ = nullptr;
};

}  // namespace

int main(int argc, char** argv) {
  const Args args = Parse(argc, argv);
  Trainer trainer(args);
  if (args.time) {
    trainer.RunTime();
  } else {
    trainer.RunCheck();
  }
  std::fflush(stdout);
  return 0;
}
