#include "tests/fuzz/fuzz_util.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>

#include "absl/status/status.h"
#include "kernels/registry.h"
#include "server/config.h"
#include "server/frame_codec.h"

namespace mapl {
namespace fuzz {
namespace {

uint64_t SplitMix(uint64_t* x) {
  uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// `count` values in `precision` from `bytes` (whose size the caller checked); false if any is
// not finite.
bool DecodeValues(v1::Precision precision, const char* bytes, int64_t count, float* dst) {
  for (int64_t i = 0; i < count; ++i) {
    if (precision == v1::PRECISION_BF16) {
      bf16_t b;
      std::memcpy(&b, bytes + i * 2, 2);
      dst[i] = Bf16ToFloat(b);
    } else {
      std::memcpy(&dst[i], bytes + i * 4, 4);
    }
    if (!std::isfinite(dst[i])) return false;
  }
  return true;
}

// The checksum of a state given as specs and f32 values (PublishedDictionary's own).
std::optional<uint64_t> StateChecksum(std::vector<DictionaryTableSpec> specs,
                                      const std::vector<std::vector<float>>& values,
                                      uint64_t version) {
  absl::StatusOr<PublishedDictionary> dict =
      PublishedDictionary::Create(std::move(specs), values, v1::PRECISION_F32, version);
  if (!dict.ok()) return std::nullopt;
  return dict->Checksum();
}

}  // namespace

void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz oracle failed: %s\n", what.c_str());
  std::abort();
}

const char* VariantName(int variant) {
  static const char* const kNames[] = {"dense",     "mapl-rvq",  "mapl-int8",
                                       "mapl-int4", "mapl-bf16", "fixed-rvq-budget"};
  return kNames[variant % kNumVariants];
}

v1::BoundaryConfig BoundaryFor(int variant, v1::Role role) {
  v1::BoundaryConfig c;
  c.set_id(3);
  c.set_role(role);
  c.set_d(kD);
  c.set_k(kK);
  c.set_vocab(kVocab);
  c.set_max_tokens(kMaxTokens);
  c.set_rvq_levels(kRvqLevels);
  c.set_anchor_rank(4);
  c.set_seed(77);
  switch (variant % kNumVariants) {
    case kDense:
      c.set_method(v1::METHOD_DENSE);
      break;
    case kMaplRvq:
      c.set_method(v1::METHOD_MAPL);
      c.set_forward_codec(v1::CODEC_RVQ);
      break;
    case kMaplInt8:
      c.set_method(v1::METHOD_MAPL);
      c.set_forward_codec(v1::CODEC_INT8);
      c.set_backward_codec(v1::CODEC_INT4);
      break;
    case kMaplInt4:
      c.set_method(v1::METHOD_MAPL);
      c.set_forward_codec(v1::CODEC_INT4);
      c.set_backward_codec(v1::CODEC_BF16);
      break;
    case kMaplBf16:
      c.set_method(v1::METHOD_MAPL);
      c.set_forward_codec(v1::CODEC_BF16);
      c.set_dictionary_precision(v1::PRECISION_BF16);
      break;
    default:  // kFixedRvqBudget
      c.set_method(v1::METHOD_FIXED);
      c.set_forward_codec(v1::CODEC_RVQ);
      c.set_forward_error_budget(0.2f);
      break;
  }
  absl::StatusOr<v1::BoundaryConfig> full = BoundaryConfigWithDefaults(c);
  if (!full.ok())
    Fail(std::string("fuzz config rejected: ") + std::string(full.status().message()));
  return *full;
}

const Backend& CpuBackend() {
  static const Backend* const backend = MakeCpuBackend().release();
  return *backend;
}

uint8_t Input::Byte() { return pos_ < size_ ? data_[pos_++] : 0; }

uint16_t Input::U16() {
  const uint16_t lo = Byte();
  return static_cast<uint16_t>(lo | (uint16_t{Byte()} << 8));
}

absl::string_view Input::Take(size_t n) {
  const size_t take = std::min(n, size_ - std::min(pos_, size_));
  absl::string_view out(reinterpret_cast<const char*>(data_) + pos_, take);
  pos_ += take;
  return out;
}

void AppendChunk(absl::string_view bytes, std::string* out) {
  if (bytes.size() > 0xffff) Fail("AppendChunk: chunk over 65535 bytes");
  out->push_back(static_cast<char>(bytes.size() & 0xff));
  out->push_back(static_cast<char>(bytes.size() >> 8));
  out->append(bytes.data(), bytes.size());
}

std::vector<float> TensorOf(uint64_t seed, uint64_t step, uint32_t microbatch, int64_t rows) {
  uint64_t x = seed * 0x100000001b3ull ^ (step << 20) ^ microbatch;
  std::vector<float> t(static_cast<size_t>(rows) * kD);
  // A few strong directions plus noise, so that the projector and the codebooks see structure.
  for (int64_t r = 0; r < rows; ++r) {
    const float a = static_cast<float>(SplitMix(&x) >> 40) * 0x1p-24f * 2.f - 1.f;
    const float b = static_cast<float>(SplitMix(&x) >> 40) * 0x1p-24f * 2.f - 1.f;
    for (int c = 0; c < kD; ++c) {
      const float noise = static_cast<float>(SplitMix(&x) >> 40) * 0x1p-24f * 0.2f - 0.1f;
      t[r * kD + c] = a * ((c % 3) == 0 ? 1.f : 0.f) + b * ((c % 5) == 1 ? 0.7f : 0.f) + noise;
    }
  }
  return t;
}

std::vector<int32_t> TokensOf(uint64_t step, uint32_t microbatch, int64_t rows) {
  std::vector<int32_t> ids(rows);
  for (int64_t r = 0; r < rows; ++r) {
    ids[r] = static_cast<int32_t>((step * 7 + microbatch * 13 + r * 3) % kVocab);
  }
  return ids;
}

int64_t RowsOf(uint32_t microbatch) {
  static constexpr int64_t kRows[] = {64, 48, 64, 17};
  return kRows[microbatch % 4];
}

void RepairFrame(v1::Frame* frame) { FrameCodec::Seal(frame); }

void RepairSnapshot(v1::DictionarySnapshot* snapshot) {
  std::vector<DictionaryTableSpec> specs;
  std::vector<std::vector<float>> values;
  for (const v1::DictionaryTable& t : snapshot->tables()) {
    const int64_t n = int64_t{t.rows()} * t.cols();
    const int64_t elem = PrecisionBytes(t.precision());
    if (elem == 0 || n == 0 || n > (int64_t{1} << 22) ||
        static_cast<int64_t>(t.data().size()) != n * elem) {
      return;
    }
    specs.push_back({t.name(), t.rows(), t.cols()});
    values.emplace_back(n);
    if (!DecodeValues(t.precision(), t.data().data(), n, values.back().data())) return;
  }
  if (std::optional<uint64_t> sum = StateChecksum(specs, values, snapshot->version())) {
    snapshot->set_checksum(*sum);
  }
}

void RepairDelta(const PublishedDictionary& base, v1::DictionaryDelta* delta) {
  if (delta->new_version() == base.version()) {
    delta->set_checksum(base.Checksum());
    return;
  }
  std::vector<std::vector<float>> values;
  for (int t = 0; t < base.num_tables(); ++t) {
    const int64_t n = base.spec(t).rows * base.spec(t).cols;
    values.emplace_back(base.table(t), base.table(t) + n);
  }
  for (const v1::DictionaryTableRows& rows : delta->tables()) {
    if (rows.table() >= static_cast<uint32_t>(base.num_tables())) return;
    const DictionaryTableSpec& s = base.spec(static_cast<int>(rows.table()));
    const int64_t elem = PrecisionBytes(rows.precision());
    if (elem == 0 || rows.rows_size() > s.rows ||
        static_cast<int64_t>(rows.data().size()) != rows.rows_size() * s.cols * elem) {
      return;
    }
    for (int i = 0; i < rows.rows_size(); ++i) {
      if (rows.rows(i) >= s.rows) return;
      if (!DecodeValues(rows.precision(), rows.data().data() + i * s.cols * elem, s.cols,
                        values[rows.table()].data() + rows.rows(i) * s.cols)) {
        return;
      }
    }
  }
  if (std::optional<uint64_t> sum = StateChecksum(base.specs(), values, delta->new_version())) {
    delta->set_checksum(*sum);
  }
}

// ---- the trained boundary ----

const Trained& TrainedBoundary(int variant) {
  static std::map<int, Trained>* const cache = new std::map<int, Trained>();
  variant %= kNumVariants;
  auto it = cache->find(variant);
  if (it != cache->end()) return it->second;
  Trained& out = (*cache)[variant];
  auto up = UpstreamEngine::Create(BoundaryFor(variant, v1::ROLE_UPSTREAM), &CpuBackend());
  auto down = DownstreamEngine::Create(BoundaryFor(variant, v1::ROLE_DOWNSTREAM), &CpuBackend());
  if (!up.ok() || !down.ok()) Fail("TrainedBoundary: engines not created");
  auto must = [](const absl::Status& s, const char* what) {
    if (!s.ok()) Fail(std::string(what) + ": " + std::string(s.message()));
  };
  // 193 rows a step: the RVQ codebooks are fitted (1024 rows) at step 6 and published by its
  // delta; step 7 updates them once more.
  for (uint64_t step = 1; step <= 7; ++step) {
    for (uint32_t mb = 0; mb < 4; ++mb) {
      const int64_t n = RowsOf(mb);
      const std::vector<float> h = TensorOf(1, step, mb, n);
      const std::vector<int32_t> ids = TokensOf(step, mb, n);
      auto fwd = (*up)->EncodeForward(step, mb, ConstTensor::F32(h.data(), n, kD), ids.data());
      must(fwd.status(), "EncodeForward");
      std::vector<float> h_hat(n * kD);
      for (const v1::PeerMessage& m : *fwd) {
        std::vector<v1::PeerMessage> replies;
        if (m.has_frame()) {
          must((*down)->Decode(m.frame(), Tensor::F32(h_hat.data(), n, kD), &replies), "Decode");
        } else {
          must((*down)->Handle(m, &replies), "Handle");
        }
      }
      const std::vector<float> g = TensorOf(2, step, mb, n);
      auto back = (*down)->EncodeBackward(step, mb, ConstTensor::F32(g.data(), n, kD));
      must(back.status(), "EncodeBackward");
      std::vector<float> dh(n * kD);
      must((*up)->DecodeBackward(back->frame(), Tensor::F32(dh.data(), n, kD)), "DecodeBackward");
    }
    auto signal = (*down)->Step(step);
    must(signal.status(), "downstream Step");
    for (const v1::PeerMessage& m : *signal) {
      std::vector<v1::PeerMessage> replies;
      must((*up)->Handle(m, &replies), "learning signal");
    }
    auto delta = (*up)->Step(step);
    must(delta.status(), "upstream Step");
    for (const v1::PeerMessage& m : *delta) {
      std::vector<v1::PeerMessage> replies;
      must((*down)->Handle(m, &replies), "delta");
    }
  }
  for (uint32_t mb = 0; mb < 4; ++mb) {
    const int64_t n = RowsOf(mb);
    const std::vector<float> h = TensorOf(1, 8, mb, n);
    const std::vector<int32_t> ids = TokensOf(8, mb, n);
    auto fwd = (*up)->EncodeForward(8, mb, ConstTensor::F32(h.data(), n, kD), ids.data());
    must(fwd.status(), "EncodeForward");
    out.next_frames.insert(out.next_frames.end(), fwd->begin(), fwd->end());
  }
  if (variant == kDense) return out;  // no dictionary
  v1::SnapshotRequest request;
  request.set_boundary(3);
  request.set_direction(v1::DIRECTION_FORWARD);
  auto snap = (*up)->HandleSnapshotRequest(request);
  if (!snap.ok() || snap->size() != 1) Fail("TrainedBoundary: no snapshot");
  out.snapshot = (*snap)[0].dictionary_snapshot();
  return out;
}

std::unique_ptr<DownstreamEngine> TrainedDownstream(int variant) {
  auto down = DownstreamEngine::Create(BoundaryFor(variant, v1::ROLE_DOWNSTREAM), &CpuBackend());
  if (!down.ok()) Fail("TrainedDownstream: not created");
  if (variant % kNumVariants != kDense) {
    if (!(*down)->HandleSnapshot(TrainedBoundary(variant).snapshot).ok()) {
      Fail("TrainedDownstream: the trained snapshot does not apply");
    }
  }
  return *std::move(down);
}

std::unique_ptr<UpstreamEngine> UpstreamWithPending(int variant,
                                                    std::vector<v1::PeerMessage>* frames) {
  auto up = UpstreamEngine::Create(BoundaryFor(variant, v1::ROLE_UPSTREAM), &CpuBackend());
  if (!up.ok()) Fail("UpstreamWithPending: not created");
  for (uint32_t mb = 0; mb < 4; ++mb) {
    const int64_t n = RowsOf(mb);
    const std::vector<float> h = TensorOf(1, 1, mb, n);
    const std::vector<int32_t> ids = TokensOf(1, mb, n);
    auto out = (*up)->EncodeForward(1, mb, ConstTensor::F32(h.data(), n, kD), ids.data());
    if (!out.ok()) Fail("UpstreamWithPending: EncodeForward failed");
    if (frames != nullptr) frames->insert(frames->end(), out->begin(), out->end());
  }
  return *std::move(up);
}

// ---- the engine driver ----

EngineDriver::EngineDriver(int variant, bool upstream, bool trained, bool repair_checksums)
    : variant_(variant % kNumVariants),
      upstream_(upstream),
      repair_(repair_checksums),
      config_(BoundaryFor(variant, upstream ? v1::ROLE_UPSTREAM : v1::ROLE_DOWNSTREAM)) {
  if (upstream_) {
    if (trained) {
      engine_ = UpstreamWithPending(variant_, nullptr);
    } else {
      auto up = UpstreamEngine::Create(config_, &CpuBackend());
      if (!up.ok()) Fail("EngineDriver: upstream not created");
      engine_ = *std::move(up);
    }
    return;
  }
  if (trained) {
    engine_ = TrainedDownstream(variant_);
  } else {
    auto down = DownstreamEngine::Create(config_, &CpuBackend());
    if (!down.ok()) Fail("EngineDriver: downstream not created");
    engine_ = *std::move(down);
  }
  if (variant_ == kDense) return;
  const DictionaryId id{config_.id(), v1::DIRECTION_FORWARD};
  if (trained) {
    auto replica = DictionaryReplica::FromSnapshot(id, TrainedBoundary(variant_).snapshot);
    if (replica.ok()) shadow_.emplace(*std::move(replica));
  } else {
    auto v0 = PublishedDictionary::Create(DictionaryTables(config_), SeededDictionary(config_),
                                          config_.dictionary_precision(), 0);
    if (!v0.ok()) Fail("EngineDriver: seeded dictionary rejected");
    auto replica = DictionaryReplica::Create(id, *std::move(v0));
    if (replica.ok()) shadow_.emplace(*std::move(replica));
  }
}

void EngineDriver::Ship(std::vector<v1::PeerMessage> messages) {
  for (v1::PeerMessage& m : messages) sent_.push_back(std::move(m));
}

void EngineDriver::Deliver(v1::PeerMessage message) {
  std::vector<v1::PeerMessage> replies;
  switch (message.body_case()) {
    case v1::PeerMessage::kFrame: {
      v1::Frame* f = message.mutable_frame();
      if (repair_) RepairFrame(f);
      // The worker's own checks before it sizes the output (BoundaryWorker::OnFrame).
      const v1::Direction receives = upstream_ ? v1::DIRECTION_BACKWARD : v1::DIRECTION_FORWARD;
      if (f->direction() != receives) return;
      if (f->tokens() == 0 || f->tokens() > config_.max_tokens()) return;
      std::vector<float> out(static_cast<size_t>(f->tokens()) * config_.d());
      const absl::Status s =
          engine_->Decode(*f, Tensor::F32(out.data(), f->tokens(), config_.d()), &replies);
      if (s.ok() && !upstream_) decoded_[{f->step(), f->microbatch()}] = f->tokens();
      break;
    }
    case v1::PeerMessage::kDictionaryDelta: {
      if (repair_ && shadow_.has_value()) {
        RepairDelta(*shadow_->current(), message.mutable_dictionary_delta());
      }
      if (engine_->Handle(message, &replies).ok() && shadow_.has_value()) {
        (void)shadow_->Apply(message.dictionary_delta());
      }
      break;
    }
    case v1::PeerMessage::kDictionarySnapshot: {
      if (repair_) RepairSnapshot(message.mutable_dictionary_snapshot());
      if (engine_->Handle(message, &replies).ok() && !upstream_ && variant_ != kDense) {
        const DictionaryId id{config_.id(), v1::DIRECTION_FORWARD};
        if (shadow_.has_value()) {
          (void)shadow_->Restore(message.dictionary_snapshot());
        } else if (auto r = DictionaryReplica::FromSnapshot(id, message.dictionary_snapshot());
                   r.ok()) {
          shadow_.emplace(*std::move(r));
        }
      }
      break;
    }
    case v1::PeerMessage::kStepMarker:  // advisory: the worker does not hand it on
    case v1::PeerMessage::kHello:       // the link's own: never reach the worker
    case v1::PeerMessage::kAck:
    case v1::PeerMessage::kHeartbeat:
    case v1::PeerMessage::BODY_NOT_SET:
      return;
    default:
      (void)engine_->Handle(message, &replies);
  }
  Ship(std::move(replies));
}

void EngineDriver::EncodeLocal(uint32_t arg) {
  absl::StatusOr<std::vector<v1::PeerMessage>> out;
  if (upstream_) {
    const uint32_t mb = arg % 8;
    const int64_t n = RowsOf(mb);
    const std::vector<float> h = TensorOf(1, next_step_, mb, n);
    const std::vector<int32_t> ids = TokensOf(next_step_, mb, n);
    out = engine_->Encode(next_step_, mb, ConstTensor::F32(h.data(), n, kD), ids.data(),
                          Engine::FiniteCheck::kCheck);
  } else {
    if (decoded_.empty()) return;
    auto it = decoded_.begin();
    std::advance(it, arg % decoded_.size());
    const auto [key, n] = *it;
    decoded_.erase(it);
    const std::vector<float> g = TensorOf(2, key.first, key.second, n);
    out = engine_->Encode(key.first, key.second, ConstTensor::F32(g.data(), n, kD), nullptr,
                          Engine::FiniteCheck::kCheck);
  }
  if (out.ok()) Ship(*std::move(out));
}

void EngineDriver::StepNext(uint32_t skip) {
  const uint64_t step = next_step_ + skip;
  if (!engine_->ReadyToStep(step)) return;  // the worker waits for the learning signal
  absl::StatusOr<std::vector<v1::PeerMessage>> out = engine_->Step(step);
  if (!out.ok()) return;
  next_step_ = step + 1;
  for (auto it = decoded_.begin(); it != decoded_.end();) {
    it = it->first.first <= step ? decoded_.erase(it) : std::next(it);
  }
  Ship(*std::move(out));
}

void EngineDriver::ReadStats() { (void)engine_->stats(); }

DictionaryOwner FuzzDictionaryOwner(v1::Precision precision) {
  std::vector<std::vector<float>> initial;
  initial.push_back(TensorOf(5, 0, 0, kD));  // (kD, kD): the first kK columns' worth
  initial[0].resize(kD * kK);
  initial.push_back(TensorOf(6, 0, 0, 2 * 256 * kK / kD));
  absl::StatusOr<DictionaryOwner> owner =
      DictionaryOwner::Create({3, v1::DIRECTION_FORWARD}, {{"U", kD, kK}, {"rvq", 2 * 256, kK}},
                              std::move(initial), precision);
  if (!owner.ok()) Fail("FuzzDictionaryOwner: " + owner.status().ToString());
  return *std::move(owner);
}

}  // namespace fuzz
}  // namespace mapl
