// Writes the seed corpora of the fuzz targets: small valid inputs (and a few
// invalid ones at the edges), deterministic, so the checked-in files can be
// regenerated and reviewed. Usage (README.md):
//   build-fuzz/tests/fuzz/fuzz_make_corpus tests/fuzz/corpus
// writes DIR/<target>/seed-* (overwriting seeds of the same name; other
// files, such as inputs that once crashed a target, stay).
//
// The inputs of fuzz_shm and the structured form of fuzz_assembler are
// decoded by FuzzedDataProvider; FdpWriter encodes the values those targets
// consume, in their order, so that a seed means a chosen sequence of
// operations. When a target changes what it consumes, regenerate its seeds.
#include <sys/stat.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cli/synth.h"
#include "client/io/safetensors.h"
#include "google/protobuf/text_format.h"
#include "kernels/common/dtype.h"
#include "medakv/v1/medakv.pb.h"
#include "service/server/convert.h"

namespace medakv {
namespace {

namespace v1 = ::medakv::v1;

void Die(const std::string& what) {
  std::fprintf(stderr, "fuzz_make_corpus: %s\n", what.c_str());
  std::exit(1);
}

void MakeDir(const std::string& dir) {
  if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) Die(absl::StrCat(dir, ": ", std::strerror(errno)));
}

void Write(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) Die(absl::StrCat(path, ": cannot write"));
  std::printf("%s (%zu bytes)\n", path.c_str(), bytes.size());
}

template <typename Message>
Message FromText(const std::string& text) {
  Message m;
  if (!google::protobuf::TextFormat::ParseFromString(text, &m)) Die("bad text proto: " + text);
  return m;
}

// ---- FuzzedDataProvider's encoding -----------------------------------------------

// Integers are consumed from the end of the data, most significant byte
// first, as many bytes as the range needs; strings from the front, '\'
// escaped as "\\" and ended by '\' and another byte.
class FdpWriter {
 public:
  template <typename T>
  FdpWriter& Int(T min, T max, T value) {
    static_assert(std::is_integral_v<T>);
    const uint64_t range = static_cast<uint64_t>(max) - static_cast<uint64_t>(min);
    const uint64_t r = static_cast<uint64_t>(value) - static_cast<uint64_t>(min);
    if (value < min || value > max) Die("FdpWriter: value out of range");
    size_t n = 0;
    for (size_t offset = 0; offset < sizeof(T) * 8 && (range >> offset) > 0; offset += 8) ++n;
    for (size_t i = 0; i < n; ++i) back_.push_back(static_cast<uint8_t>(r >> (8 * (n - 1 - i))));
    return *this;
  }
  FdpWriter& Bool(bool b) { return Int<uint8_t>(0, 255, b ? 1 : 0); }
  // ConsumeRandomLengthString(max_length) with s shorter than max_length.
  FdpWriter& String(const std::string& s) {
    for (char c : s) front_ += c == '\\' ? std::string("\\\\") : std::string(1, c);
    front_ += "\\x";
    return *this;
  }
  std::string Data() const { return front_ + std::string(back_.rbegin(), back_.rend()); }

 private:
  std::string front_;
  std::vector<uint8_t> back_;  // in the order they are consumed
};

// ---- fuzz_header -------------------------------------------------------------------

void HeaderSeeds(const std::string& dir) {
  const std::pair<const char*, const char*> compress[] = {
      {"seed-queries-meda",
       R"(header { shape { layers: 2 kv_heads: 2 q_heads: 4 head_dim: 8 tokens: 16 dtype: DTYPE_FLOAT16
                   layout: LAYOUT_HND modality { start: 2 length: 6 modality: MODALITY_VISUAL }
                   modality { start: 10 length: 2 modality: MODALITY_TEXT } }
                 policy { rho: 0.2 meda { tau: 1 alpha_min: 0.01 alpha_max: 1 exact_total: true
                   entropy_heads: ENTROPY_HEADS_MEAN_ENTROPY entropy_source: ENTROPY_SOURCE_CAUSAL
                   select { recent_fraction: 0.5 text_prior: TEXT_PRIOR_ADDITIVE shared_selection: false
                            merge: MERGE_MODE_AVERAGE merge_threshold: MERGE_THRESHOLD_MEAN scale: 0.25 } } }
                 stats: STATS_FORM_QUERIES q_tokens: 4 query_positions: true
                 max_response_chunk_bytes: 4096 })"},
      {"seed-precomputed-snapkv",
       R"(header { shape { layers: 3 kv_heads: 1 q_heads: 3 head_dim: 4 tokens: 9 dtype: DTYPE_FLOAT32
                   layout: LAYOUT_NHD }
                 policy { snapkv { window: 4 pool_kernel: 3 select { merge: MERGE_MODE_NONE } } }
                 stats: STATS_FORM_PRECOMPUTED score_heads: 3 })"},
      {"seed-pyramidkv-bf16",
       R"(header { shape { layers: 4 kv_heads: 2 q_heads: 2 head_dim: 2 tokens: 33 dtype: DTYPE_BFLOAT16
                   modality { start: 0 length: 33 modality: MODALITY_VISUAL } }
                 policy { rho: 0.5 pyramidkv { window: 8 pool_kernel: 5 beta: 20
                   select { text_prior: TEXT_PRIOR_NONE merge: MERGE_MODE_WEIGHTED } } }
                 stats: STATS_FORM_QUERIES q_tokens: 33 })"},
      {"seed-streaming-llm",
       R"(header { shape { layers: 1 kv_heads: 1 head_dim: 1 tokens: 1 dtype: DTYPE_FLOAT16 }
                 policy { streaming_llm { sinks: 4 } } stats: STATS_FORM_PRECOMPUTED score_heads: 1 })"},
      {"seed-h2o-look-m-full",
       R"(header { shape { layers: 1 kv_heads: 4 q_heads: 8 head_dim: 16 tokens: 100 dtype: DTYPE_FLOAT16 }
                 policy { look_m { select { text_prior: TEXT_PRIOR_KEEP_ALL_TEXT merge: MERGE_MODE_PIVOTAL } } }
                 stats: STATS_FORM_QUERIES q_tokens: 1
                 output { region: "out" offset: 0 length: 4096 } })"},
      {"seed-overlapping-spans",
       R"(header { shape { layers: 1 kv_heads: 1 q_heads: 1 head_dim: 4 tokens: 20 dtype: DTYPE_FLOAT32
                   modality { start: 5 length: 5 modality: MODALITY_VISUAL }
                   modality { start: 0 length: 6 modality: MODALITY_VISUAL } }
                 policy { h2o { } } stats: STATS_FORM_QUERIES q_tokens: 2 })"},
      {"seed-huge-shape",
       R"(header { shape { layers: 4096 kv_heads: 4096 q_heads: 4096 head_dim: 4096 tokens: 16777216
                   dtype: DTYPE_FLOAT32 }
                 policy { full { } } stats: STATS_FORM_QUERIES q_tokens: 16777216 })"},
      {"seed-bad-enums",
       R"(header { shape { layers: 1 kv_heads: 1 head_dim: 4 tokens: 8 dtype: DTYPE_FLOAT16 layout: 7 }
                 policy { rho: 1.5 meda { alpha_min: 0.9 alpha_max: 0.1 } } stats: 9 })"},
  };
  for (const auto& [name, text] : compress) {
    Write(absl::StrCat(dir, "/", name), FromText<v1::CompressRequest>(text).SerializeAsString());
  }
  // The same bytes are also read as a PutCacheRequest and a CompressCacheRequest.
  Write(absl::StrCat(dir, "/seed-put-cache"),
        FromText<v1::PutCacheRequest>(
            R"(header { cache_id: "prompt:0123/abc" shape { layers: 2 kv_heads: 2 head_dim: 8 tokens: 5
                 dtype: DTYPE_FLOAT16 modality { start: 1 length: 2 modality: MODALITY_VISUAL } }
                 stats: STATS_FORM_NONE ttl_seconds: 60 overwrite: true })")
            .SerializeAsString());
  Write(absl::StrCat(dir, "/seed-compress-cache"),
        FromText<v1::CompressCacheRequest>(
            R"(cache_id: "prompt:0123/abc" policy { rho: 0.3 meda { select { recent_fraction: 0.75 } } })")
            .SerializeAsString());
}

// ---- fuzz_assembler ----------------------------------------------------------------

// The tensors of `spec` with moderate values and valid statistics, as
// chunk messages: every tensor in two pieces, layers interleaved.
template <typename Request>
std::vector<Request> Chunks(const CacheSpec& spec) {
  std::vector<std::pair<v1::TensorChunk, v1::TensorChunk>> halves;
  uint32_t state = 12345;
  auto next = [&] {
    state = state * 1664525u + 1013904223u;
    return state >> 8;
  };
  for (int64_t l = 0; l < spec.layers; ++l) {
    for (v1::TensorKind kind : CarriedKinds(spec)) {
      const int64_t bytes = TensorBytes(spec, kind);
      std::string data(static_cast<size_t>(bytes), '\0');
      const int64_t esize = kind == v1::TENSOR_KIND_KEY || kind == v1::TENSOR_KIND_VALUE ||
                                    kind == v1::TENSOR_KIND_QUERY
                                ? DTypeSize(spec.dtype)
                                : 4;
      for (int64_t i = 0; i < bytes / esize; ++i) {
        const float f = static_cast<float>(next() % 2001) / 1000.f - 1.f;  // [-1, 1]
        if (kind == v1::TENSOR_KIND_QUERY_POSITIONS) {
          const auto p = static_cast<int32_t>(spec.tokens - spec.q_tokens + i);
          std::memcpy(&data[4 * i], &p, 4);
        } else if (kind == v1::TENSOR_KIND_SCORES || kind == v1::TENSOR_KIND_ENTROPY ||
                   spec.dtype == DType::kFloat32) {
          const float v = kind == v1::TENSOR_KIND_SCORES ? f + 1.f : kind == v1::TENSOR_KIND_ENTROPY ? 1.5f : f;
          std::memcpy(&data[4 * i], &v, 4);
        } else {
          const uint16_t b = spec.dtype == DType::kFloat16 ? FloatToHalfBits(f) : FloatToBFloat16Bits(f);
          std::memcpy(&data[2 * i], &b, 2);
        }
      }
      const int64_t cut = (bytes + 1) / 2;
      std::pair<v1::TensorChunk, v1::TensorChunk> h;
      h.first.set_layer(static_cast<int32_t>(l));
      h.first.set_tensor(kind);
      h.first.set_offset(0);
      h.first.set_data(data.substr(0, static_cast<size_t>(cut)));
      h.second = h.first;
      h.second.set_offset(cut);
      h.second.set_data(data.substr(static_cast<size_t>(cut)));
      halves.push_back(std::move(h));
    }
  }
  std::vector<Request> out;
  for (auto& h : halves) *out.emplace_back().mutable_chunk() = h.first;
  for (auto& h : halves) {
    if (!h.second.data().empty()) *out.emplace_back().mutable_chunk() = h.second;
  }
  return out;
}

template <typename Request>
std::string Stream(uint8_t mode, const Request& header, const std::vector<Request>& chunks) {
  std::string out(1, static_cast<char>(mode));
  auto add = [&](const Request& r) {
    const std::string bytes = r.SerializeAsString();
    if (bytes.size() > 0xFFFF) Die("message too long for a stream seed");
    out.push_back(static_cast<char>(bytes.size() & 0xFF));
    out.push_back(static_cast<char>(bytes.size() >> 8));
    out += bytes;
  };
  add(header);
  for (const Request& c : chunks) add(c);
  return out;
}

template <typename Request>
std::string StreamSeed(uint8_t mode, const std::string& header_text, int drop_last = 0) {
  const Request header = FromText<Request>(header_text);
  absl::StatusOr<CacheSpec> spec = SpecFromHeader(header.header(), 0);
  if (!spec.ok()) Die(spec.status().ToString());
  std::vector<Request> chunks = Chunks<Request>(*spec);
  chunks.resize(chunks.size() - static_cast<size_t>(drop_last));
  return Stream(mode, header, chunks);
}

void AssemblerSeeds(const std::string& dir) {
  Write(absl::StrCat(dir, "/seed-stream-queries-meda"),
        StreamSeed<v1::CompressRequest>(
            0, R"(header { shape { layers: 2 kv_heads: 1 q_heads: 2 head_dim: 3 tokens: 7 dtype: DTYPE_FLOAT16
                        modality { start: 2 length: 3 modality: MODALITY_VISUAL } }
                      policy { rho: 0.5 } stats: STATS_FORM_QUERIES q_tokens: 2 query_positions: true })"));
  Write(absl::StrCat(dir, "/seed-stream-precomputed-snapkv"),
        StreamSeed<v1::CompressRequest>(
            0, R"(header { shape { layers: 3 kv_heads: 2 q_heads: 4 head_dim: 2 tokens: 5 dtype: DTYPE_FLOAT32
                        layout: LAYOUT_NHD }
                      policy { snapkv { window: 2 pool_kernel: 3 } } stats: STATS_FORM_PRECOMPUTED
                      score_heads: 4 })"));
  Write(absl::StrCat(dir, "/seed-stream-queries-look-m-bf16"),
        StreamSeed<v1::CompressRequest>(
            0, R"(header { shape { layers: 1 kv_heads: 2 q_heads: 2 head_dim: 4 tokens: 9 dtype: DTYPE_BFLOAT16
                        modality { start: 0 length: 4 modality: MODALITY_VISUAL } }
                      policy { look_m { } } stats: STATS_FORM_QUERIES q_tokens: 3 })"));
  Write(absl::StrCat(dir, "/seed-stream-put-cache"),
        StreamSeed<v1::PutCacheRequest>(
            2, R"(header { cache_id: "c" shape { layers: 2 kv_heads: 1 head_dim: 2 tokens: 3 dtype: DTYPE_FLOAT16 }
                      stats: STATS_FORM_NONE })"));
  Write(absl::StrCat(dir, "/seed-stream-incomplete"),
        StreamSeed<v1::CompressRequest>(
            0, R"(header { shape { layers: 2 kv_heads: 1 q_heads: 1 head_dim: 2 tokens: 4 dtype: DTYPE_FLOAT16 }
                      policy { streaming_llm { sinks: 1 } } stats: STATS_FORM_PRECOMPUTED score_heads: 1 })",
            /*drop_last=*/1));
  // The structured form: any bytes decode to a small valid header and chunks.
  uint32_t state = 7;
  for (int i = 0; i < 4; ++i) {
    std::string bytes(1, static_cast<char>(i % 2 == 0 ? 1 : 3));
    for (int k = 0; k < 200 + 300 * i; ++k) {
      state = state * 1103515245u + 12345u;
      bytes.push_back(static_cast<char>(state >> 16));
    }
    Write(absl::StrCat(dir, "/seed-structured-", i), bytes);
  }
}

// ---- fuzz_safetensors ----------------------------------------------------------------

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.good() && !in.eof()) Die(path + ": cannot read");
  return s;
}

void SafetensorsSeeds(const std::string& dir) {
  // What `medakv synth` writes (WriteSynthCache), with tiny shapes.
  struct Synth {
    const char* name;
    SynthOptions o;
  };
  std::vector<Synth> synth(4);
  synth[0].name = "seed-synth-queries-f16";
  synth[0].o.layers = 2, synth[0].o.kv_heads = 1, synth[0].o.q_heads = 2, synth[0].o.tokens = 8;
  synth[0].o.head_dim = 2, synth[0].o.q_tokens = 2, synth[0].o.sinks = 1, synth[0].o.image_clusters = 2;
  synth[1] = synth[0];
  synth[1].name = "seed-synth-precomputed-f32-nhd";
  synth[1].o.precomputed = true, synth[1].o.dtype = DType::kFloat32, synth[1].o.layout = Layout::kNHD;
  synth[2] = synth[0];
  synth[2].name = "seed-synth-text-only-bf16";
  synth[2].o.text_only = true, synth[2].o.dtype = DType::kBFloat16, synth[2].o.layers = 1;
  synth[3] = synth[0];
  synth[3].name = "seed-synth-two-images";
  synth[3].o.tokens = 12, synth[3].o.kv_heads = 2, synth[3].o.q_heads = 4, synth[3].o.q_tokens = 3;
  synth[3].o.visual = {ModalitySpan{2, 3, Modality::kVisual}, ModalitySpan{7, 4, Modality::kVisual}};
  for (const Synth& s : synth) {
    const std::string path = absl::StrCat(dir, "/", s.name);
    if (absl::Status st = WriteSynthCache(s.o, path); !st.ok()) Die(st.ToString());
    std::printf("%s (%zu bytes)\n", path.c_str(), ReadFile(path).size());
  }

  // Hand-made files at the edges of the format.
  auto serialize = [&](const safetensors::Writer& w, const std::string& name) {
    absl::StatusOr<std::string> bytes = w.Serialize();
    if (!bytes.ok()) Die(bytes.status().ToString());
    Write(absl::StrCat(dir, "/", name), *bytes);
  };
  {
    safetensors::Writer w;  // no tensors at all
    serialize(w, "seed-empty");
  }
  {
    // Every element type, a scalar, a zero-size tensor, metadata, an
    // unaligned tensor (after the 1-byte one).
    static const uint8_t kBytes[64] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    safetensors::Writer w;
    using safetensors::ElementType;
    int i = 0;
    for (ElementType t : {ElementType::kBool, ElementType::kF16, ElementType::kBF16, ElementType::kF32,
                          ElementType::kF64, ElementType::kI8, ElementType::kU8, ElementType::kI16,
                          ElementType::kU16, ElementType::kI32, ElementType::kU32, ElementType::kI64,
                          ElementType::kU64}) {
      const int64_t n = i % 3 + 1;
      const absl::Status s = w.Add(absl::StrCat("t", i++, "_", safetensors::ElementTypeName(t)), t, {n},
                                   absl::Span<const uint8_t>(kBytes, n * safetensors::ElementSize(t)));
      if (!s.ok()) Die(s.ToString());
    }
    if (!w.Add("scalar", ElementType::kF32, {}, absl::Span<const uint8_t>(kBytes, 4)).ok() ||
        !w.Add("empty", ElementType::kF16, {3, 0, 2}, {}).ok()) {
      Die("hand-made tensors");
    }
    w.SetMetadata("format", "pt");
    w.SetMetadata("note", "\xc3\xa9t\xc3\xa9");
    serialize(w, "seed-every-type");
  }
  // Raw bytes: a header that is not JSON, one whose length runs past the
  // file, and a valid one with a hole in the data buffer.
  auto raw = [&](const std::string& header, const std::string& data, const std::string& name) {
    std::string out(8, '\0');
    for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(static_cast<uint64_t>(header.size()) >> (8 * i));
    Write(absl::StrCat(dir, "/", name), out + header + data);
  };
  raw(R"({"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"__metadata__":{"k":"v"}})", "abcd",
      "seed-raw-valid");
  raw(R"({"a":{"dtype":"F16","shape":[2],"data_offsets":[2,6]}})", "xxabcd", "seed-raw-hole");
  raw(R"({"a":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})", "a", "seed-raw-unsupported-dtype");
  raw(R"({"layer.0.key":{"dtype":"F16","shape":[1,1,1],"data_offsets":[0,2]},)"
      R"("layer.0.value":{"dtype":"F16","shape":[1,1,1],"data_offsets":[2,4]},)"
      R"("layer.0.scores":{"dtype":"F32","shape":[1,1],"data_offsets":[4,8]},)"
      R"("layer.0.entropy":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
      std::string("\x00\x3c\x00\x3c\x00\x00\x80\x3f\x00\x00\x00\x40", 12), "seed-raw-minimal-cache");
}

// ---- fuzz_shm ------------------------------------------------------------------------

// The operations of fuzz_shm.cc's Run, encoded.
class ShmSeed {
 public:
  ShmSeed(int max_regions, bool big, int64_t max_bytes, bool denied, int64_t head_dim, int64_t tokens) {
    w_.Int<int>(0, 3, max_regions).Bool(big);
    if (!big) w_.Int<int64_t>(0, 2 * kMax, max_bytes);
    w_.Int<int>(0, 15, denied ? 0 : 1).Int<int64_t>(1, 16, head_dim).Int<int64_t>(1, 64, tokens);
    tensor_bytes_ = head_dim * tokens * 4;
    denied_ = denied;
  }
  // op 0 with the default name "r<n>" and the object's size.
  // op 0 with the default name "r<n>" and the object's size (which the
  // registry must accept).
  ShmSeed& Register(int64_t size) {
    Op(0).Int<int64_t>(1, kMax, size).Bool(true).Bool(true);
    names_.push_back(absl::StrCat("r", ++objects_));
    registered_[names_.back()] = size;
    sizes_.push_back(size);
    return *this;
  }
  ShmSeed& RegisterNamed(int64_t size, const std::string& name, int64_t registered, bool accepted) {
    Op(0).Int<int64_t>(1, kMax, size).Bool(false);
    Name(name);
    w_.Bool(false);
    Draw(registered, size);
    names_.push_back(name);
    if (accepted) registered_[name] = registered;
    ++objects_;
    sizes_.push_back(size);
    return *this;
  }
  // op 1: Check, Read and Write of [offset, offset + length) of region `name`.
  ShmSeed& Check(const std::string& name, int64_t offset, int64_t length) {
    Op(1);
    const int64_t size = Name(name);
    Hold(name);
    Draw(offset, size);
    Draw(length, size);
    return *this;
  }
  // op 3: a chunk of kind (1 key, 2 value) at the right offset from a ref.
  ShmSeed& Chunk(int kind, const std::string& name, int64_t offset, int64_t length) {
    Op(3).Int<int>(0, 8, 1).Int<int>(0, 8, 1).Int<int>(1, 2, kind).Int<int>(0, 8, 1);
    const int64_t size = Name(name);
    Hold(name);
    w_.Bool(true).Int<int64_t>(0, size, offset).Bool(true).Int<int64_t>(1, tensor_bytes_, length);
    return *this;
  }
  ShmSeed& Unregister(const std::string& name) {
    Op(4);
    Name(name);
    registered_.erase(name);
    return *this;
  }
  ShmSeed& Truncate(size_t object, int64_t size) {
    Op(5).Int<size_t>(0, objects_ - 1, object).Int<int64_t>(0, sizes_[object], size);
    return *this;
  }
  ShmSeed& Finish() {
    Op(6);
    return *this;
  }
  ShmSeed& Output(const std::string& name, int64_t offset, int64_t length) {
    Op(7);
    Name(name);
    Hold(name);
    Draw(offset, kMax);
    Draw(length, kMax);
    return *this;
  }
  std::string Data() const { return w_.Data(); }
  int64_t tensor_bytes() const { return tensor_bytes_; }

 private:
  static constexpr int64_t kMax = int64_t{1} << 16;
  // A ref's check makes the call hold a registered region (access allowed).
  void Hold(const std::string& name) {
    if (!denied_ && held_.count(name) == 0 && registered_.count(name) != 0) held_[name] = registered_[name];
  }
  FdpWriter& Op(int op) { return w_.Int<int>(0, 7, op); }
  // DrawRegionName; returns the size fuzz_shm assumes for the ref: that of
  // the region the call holds under the name, else the registered one, else 64.
  int64_t Name(const std::string& name) {
    for (size_t i = 0; i < names_.size(); ++i) {
      if (names_[i] == name) {
        w_.Int<int>(0, 7, 1).Int<size_t>(0, names_.size() - 1, i);
        if (auto it = held_.find(name); it != held_.end()) return it->second;
        if (auto it = registered_.find(name); it != registered_.end()) return it->second;
        return 64;
      }
    }
    if (!names_.empty()) w_.Int<int>(0, 7, 0);
    w_.String(name);
    return 64;
  }
  // DrawInt: near the bounds when it can, else arbitrary.
  void Draw(int64_t v, int64_t size) {
    if (v >= -2 && v <= size + 2) {
      w_.Int<int>(0, 4, 1).Int<int64_t>(-2, size + 2, v);
    } else if (v >= std::numeric_limits<int64_t>::max() - 2) {
      w_.Int<int>(0, 4, 3).Int<int64_t>(0, 2, std::numeric_limits<int64_t>::max() - v);
    } else {
      w_.Int<int>(0, 4, 0).Int<int64_t>(std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(), v);
    }
  }
  FdpWriter w_;
  std::vector<std::string> names_;
  std::vector<int64_t> sizes_;
  std::map<std::string, int64_t> registered_, held_;  // name -> registered size
  size_t objects_ = 0;
  int64_t tensor_bytes_ = 0;
  bool denied_ = false;
};

void ShmSeeds(const std::string& dir) {
  constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();
  {  // refs inside, at and past the end; chunks from a region; Finish; an output ref
    ShmSeed s(3, true, 0, false, 4, 8);  // key and value of 128 bytes
    s.Register(4096).Check("r1", 0, 4096).Check("r1", 4000, 97).Check("r1", 4096, 1);
    s.Chunk(1, "r1", 0, 100).Chunk(1, "r1", 100, 28).Chunk(2, "r1", 3968, 128).Finish();
    s.Output("r1", 0, 4096).Output("nope", 0, 1);
    Write(dir + "/seed-refs-and-chunks", s.Data());
  }
  {  // a truncated object: reads inside its last page, faults past it
    ShmSeed s(2, true, 0, false, 2, 16);
    s.Register(3 * 4096 + 5).Check("r1", 0, 64).Truncate(0, 100);
    s.Check("r1", 0, 100).Check("r1", 50, 4046).Check("r1", 4095, 2).Check("r1", 8192, 10);
    s.Chunk(1, "r1", 0, 128).Chunk(2, "r1", 9000, 128).Truncate(0, 3 * 4096).Check("r1", 8192, 10);
    Write(dir + "/seed-truncated-object", s.Data());
  }
  {  // two regions; one unregistered after the call used it, one before
    ShmSeed s(2, true, 0, false, 1, 1);
    s.Register(64).Register(8192).Check("r1", 0, 64).Unregister("r1").Unregister("r2");
    s.Check("r1", 1, 63).Check("r2", 0, 1).Unregister("r1").Register(100).Check("r3", 99, 1);
    Write(dir + "/seed-unregister", s.Data());
  }
  {  // offsets and lengths near the int64 limits
    ShmSeed s(1, true, 0, false, 1, 1);
    s.Register(1024).Check("r1", kI64Max, kI64Max).Check("r1", 1, kI64Max).Check("r1", kI64Max - 1, 2);
    s.Check("r1", -1, 1).Check("r1", std::numeric_limits<int64_t>::min(), 2).Check("r1", 0, 0).Check("r1", 0, -5);
    s.Output("r1", 1023, 1).Output("r1", 1024, 1);
    Write(dir + "/seed-int64-limits", s.Data());
  }
  {  // registrations the registry refuses: names, sizes, limits
    ShmSeed s(1, false, 5000, false, 1, 1);
    s.RegisterNamed(100, "bad name!", 100, false).RegisterNamed(100, "ok", 200, false);
    s.RegisterNamed(4096, "a", 4096, true).RegisterNamed(100, "a", 100, false);  // ALREADY_EXISTS
    s.Check("a", 4000, 96);
    Write(dir + "/seed-registrations", s.Data());
  }
  {  // a peer that may not use shared memory
    ShmSeed s(3, true, 0, true, 1, 1);
    s.Register(64).Check("r1", 0, 8).Chunk(1, "r1", 0, 4).Output("r1", 0, 8);
    Write(dir + "/seed-permission-denied", s.Data());
  }
}

}  // namespace
}  // namespace medakv

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR   (e.g. tests/fuzz/corpus)\n", argv[0]);
    return 2;
  }
  const std::string root = argv[1];
  medakv::MakeDir(root);
  for (const char* t : {"fuzz_header", "fuzz_assembler", "fuzz_safetensors", "fuzz_shm"}) {
    medakv::MakeDir(root + "/" + t);
  }
  medakv::HeaderSeeds(root + "/fuzz_header");
  medakv::AssemblerSeeds(root + "/fuzz_assembler");
  medakv::SafetensorsSeeds(root + "/fuzz_safetensors");
  medakv::ShmSeeds(root + "/fuzz_shm");
  return 0;
}
