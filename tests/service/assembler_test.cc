// Chunk assembly: a cache split into chunks of random sizes, interleaved
// across layers and tensors, assembles into a CacheInput whose tensors equal
// the original bytes; every malformed chunk sequence is rejected with its
// code and a message naming the tensor.
#include "service/server/assembler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "tests/kernels/test_util.h"

namespace medakv {
namespace {

namespace v1 = ::medakv::v1;
using test::Rng;

#define EXPECT_STATUS(expr, code_, fragment)                                  \
  do {                                                                        \
    const absl::Status st_ = (expr);                                          \
    EXPECT_EQ(st_.code(), (code_)) << st_;                                    \
    EXPECT_NE(std::string(st_.message()).find(fragment), std::string::npos)   \
        << "message: '" << st_.message() << "' lacks '" << (fragment) << "'"; \
  } while (false)

#define EXPECT_INVALID(expr, fragment) EXPECT_STATUS(expr, absl::StatusCode::kInvalidArgument, fragment)

#define ASSERT_OK(expr)              \
  do {                               \
    const absl::Status st_ = (expr); \
    ASSERT_TRUE(st_.ok()) << st_;    \
  } while (false)

// 3 layers, 2 kv heads, 6 query heads, head_dim 5, 7 tokens, 3 query rows:
// odd sizes so that no tensor is a multiple of 4 bytes in fp16.
CacheSpec SmallSpec(SpecStats stats, DType dtype = DType::kFloat16, Layout layout = Layout::kHND, bool positions = true,
                    int64_t score_heads = 2) {
  CacheSpec s;
  s.layers = 3;
  s.kv_heads = 2;
  s.q_heads = 6;
  s.head_dim = 5;
  s.tokens = 7;
  s.dtype = dtype;
  s.layout = layout;
  s.visual_spans = SpansFromModality({0, 1, 1, 0, 0, 1, 0});
  s.stats = stats;
  if (stats == SpecStats::kQueries) {
    s.q_tokens = 3;
    s.has_query_positions = positions;
  }
  if (stats == SpecStats::kPrecomputed) s.score_heads = score_heads;
  return s;
}

CacheAssembler MakeAssembler(const CacheSpec& spec) {
  absl::StatusOr<CacheAssembler> a = CacheAssembler::Create(spec);
  EXPECT_TRUE(a.ok()) << a.status();
  return *std::move(a);
}

// Finite values of the dtype, as little-endian bytes.
std::string RandomValues(DType dtype, int64_t count, Rng& rng) {
  std::string out(static_cast<size_t>(count * DTypeSize(dtype)), '\0');
  for (int64_t i = 0; i < count; ++i) {
    const float f = static_cast<float>(rng.Normal());
    if (dtype == DType::kFloat32) {
      std::memcpy(&out[static_cast<size_t>(4 * i)], &f, 4);
    } else {
      const uint16_t bits = dtype == DType::kFloat16 ? FloatToHalfBits(f) : FloatToBFloat16Bits(f);
      std::memcpy(&out[static_cast<size_t>(2 * i)], &bits, 2);
    }
  }
  return out;
}

// Every tensor of a cache, as the bytes a client would send.
using Tensors = std::map<std::pair<int64_t, v1::TensorKind>, std::string>;

Tensors RandomCache(const CacheSpec& spec, uint64_t seed) {
  Rng rng(seed);
  Tensors t;
  for (int64_t l = 0; l < spec.layers; ++l) {
    for (v1::TensorKind kind : CarriedKinds(spec)) {
      const int64_t bytes = TensorBytes(spec, kind);
      std::string& data = t[{l, kind}];
      switch (kind) {
        case v1::TENSOR_KIND_KEY:
        case v1::TENSOR_KIND_VALUE:
        case v1::TENSOR_KIND_QUERY:
          data = RandomValues(spec.dtype, bytes / DTypeSize(spec.dtype), rng);
          break;
        case v1::TENSOR_KIND_QUERY_POSITIONS:
          for (int64_t i = 0; i < spec.q_tokens; ++i) {
            const auto p = static_cast<int32_t>(rng.Int(0, spec.tokens - 1));
            data.append(reinterpret_cast<const char*>(&p), 4);
          }
          break;
        case v1::TENSOR_KIND_SCORES:
          for (int64_t i = 0; i < bytes / 4; ++i) {
            const auto s = static_cast<float>(rng.Uniform());
            data.append(reinterpret_cast<const char*>(&s), 4);
          }
          break;
        case v1::TENSOR_KIND_QUERY_OUTSIDE_LSE:
          for (int64_t i = 0; i < bytes / 4; ++i) {
            const auto x = i % 5 == 0 ? -std::numeric_limits<float>::infinity()
                                      : static_cast<float>(rng.Uniform(-3.0, 6.0));
            data.append(reinterpret_cast<const char*>(&x), 4);
          }
          break;
        case v1::TENSOR_KIND_ENTROPY: {
          const auto e = static_cast<float>(rng.Uniform(0.0, 3.0));
          data.append(reinterpret_cast<const char*>(&e), 4);
          break;
        }
        default:
          break;
      }
      EXPECT_EQ(static_cast<int64_t>(data.size()), bytes);
    }
  }
  return t;
}

// The chunks of every tensor (random sizes from 1 byte to the whole tensor,
// in order within a tensor), interleaved at random across tensors and layers.
std::vector<v1::TensorChunk> RandomChunks(const Tensors& tensors, uint64_t seed) {
  Rng rng(seed);
  std::vector<std::deque<v1::TensorChunk>> queues;
  for (const auto& [key, data] : tensors) {
    std::deque<v1::TensorChunk>& q = queues.emplace_back();
    const int64_t n = static_cast<int64_t>(data.size());
    for (int64_t offset = 0; offset < n;) {
      const int64_t left = n - offset;
      int64_t size = 0;
      switch (rng.Int(0, 3)) {
        case 0:
          size = 1;
          break;
        case 1:
          size = left;
          break;
        default:
          size = rng.Int(1, left);
      }
      v1::TensorChunk c;
      c.set_layer(static_cast<int32_t>(key.first));
      c.set_tensor(key.second);
      c.set_offset(offset);
      c.set_data(data.substr(static_cast<size_t>(offset), static_cast<size_t>(size)));
      q.push_back(std::move(c));
      offset += size;
    }
  }
  std::vector<v1::TensorChunk> out;
  for (;;) {
    std::vector<size_t> open;
    for (size_t i = 0; i < queues.size(); ++i) {
      if (!queues[i].empty()) open.push_back(i);
    }
    if (open.empty()) break;
    std::deque<v1::TensorChunk>& q =
        queues[open[static_cast<size_t>(rng.Int(0, static_cast<int64_t>(open.size()) - 1))]];
    out.push_back(std::move(q.front()));
    q.pop_front();
  }
  return out;
}

std::string ViewBytes(const TensorView& v) {
  return std::string(static_cast<const char*>(v.data), static_cast<size_t>(v.NumBytes()));
}

// Checks that the assembled input carries exactly the original tensors.
void ExpectInputEquals(const CacheAssembler& a, const Tensors& tensors) {
  const CacheSpec& spec = a.spec();
  const CacheInput& in = a.input();
  EXPECT_EQ(in.kv_heads, spec.kv_heads);
  EXPECT_EQ(in.q_heads, spec.q_heads);
  EXPECT_EQ(in.head_dim, spec.head_dim);
  EXPECT_EQ(in.tokens, spec.tokens);
  EXPECT_EQ(in.dtype, spec.dtype);
  EXPECT_EQ(in.layout, spec.layout);
  EXPECT_EQ(in.modality, ModalityVector(spec));
  EXPECT_EQ(in.stats, spec.stats == SpecStats::kPrecomputed ? StatsForm::kPrecomputed : StatsForm::kQueries);
  ASSERT_EQ(static_cast<int64_t>(in.layers.size()), spec.layers);
  for (int64_t l = 0; l < spec.layers; ++l) {
    SCOPED_TRACE(absl::StrCat("layer ", l));
    const LayerInput& layer = in.layers[static_cast<size_t>(l)];
    for (const TensorView* v : {&layer.key, &layer.value}) {
      EXPECT_EQ(v->heads, spec.kv_heads);
      EXPECT_EQ(v->tokens, spec.tokens);
      EXPECT_EQ(v->head_dim, spec.head_dim);
      EXPECT_EQ(v->dtype, spec.dtype);
      EXPECT_EQ(v->layout, spec.layout);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(v->data) % 4, 0u);
    }
    EXPECT_EQ(ViewBytes(layer.key), tensors.at({l, v1::TENSOR_KIND_KEY}));
    EXPECT_EQ(ViewBytes(layer.value), tensors.at({l, v1::TENSOR_KIND_VALUE}));
    EXPECT_EQ(a.tensor(l, v1::TENSOR_KIND_KEY), tensors.at({l, v1::TENSOR_KIND_KEY}));
    if (spec.stats == SpecStats::kQueries) {
      EXPECT_EQ(layer.query.heads, spec.q_heads);
      EXPECT_EQ(layer.query.tokens, spec.q_tokens);
      EXPECT_EQ(layer.query.layout, spec.layout);
      EXPECT_EQ(ViewBytes(layer.query), tensors.at({l, v1::TENSOR_KIND_QUERY}));
      if (spec.has_query_positions) {
        const std::string& p = tensors.at({l, v1::TENSOR_KIND_QUERY_POSITIONS});
        ASSERT_EQ(layer.query_positions.size() * 4, p.size());
        EXPECT_EQ(std::memcmp(layer.query_positions.data(), p.data(), p.size()), 0);
      } else {
        EXPECT_TRUE(layer.query_positions.empty());
      }
      if (spec.has_query_outside_lse) {
        const std::string& o = tensors.at({l, v1::TENSOR_KIND_QUERY_OUTSIDE_LSE});
        ASSERT_EQ(layer.query_outside_lse.size() * 4, o.size());
        EXPECT_EQ(std::memcmp(layer.query_outside_lse.data(), o.data(), o.size()), 0);
        EXPECT_EQ(a.tensor(l, v1::TENSOR_KIND_QUERY_OUTSIDE_LSE), o);
      } else {
        EXPECT_TRUE(layer.query_outside_lse.empty());
      }
      EXPECT_EQ(layer.scores, nullptr);
    } else if (spec.stats == SpecStats::kPrecomputed) {
      const std::string& s = tensors.at({l, v1::TENSOR_KIND_SCORES});
      ASSERT_NE(layer.scores, nullptr);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(layer.scores) % 4, 0u);
      EXPECT_EQ(layer.score_heads, spec.score_heads);
      EXPECT_EQ(std::memcmp(layer.scores, s.data(), s.size()), 0);
      float e = 0.f;
      std::memcpy(&e, tensors.at({l, v1::TENSOR_KIND_ENTROPY}).data(), 4);
      EXPECT_EQ(layer.entropy, e);
      EXPECT_EQ(layer.query.data, nullptr);
    } else {
      EXPECT_EQ(layer.query.data, nullptr);
      EXPECT_EQ(layer.scores, nullptr);
    }
  }
}

struct Form {
  const char* name;
  SpecStats stats;
  bool positions;
  int64_t score_heads;
};
constexpr Form kForms[] = {{"queries+positions", SpecStats::kQueries, true, 0},
                           {"queries", SpecStats::kQueries, false, 0},
                           {"precomputed kv heads", SpecStats::kPrecomputed, false, 2},
                           {"precomputed q heads", SpecStats::kPrecomputed, false, 6},
                           {"none", SpecStats::kNone, false, 0}};

TEST(CacheAssembler, RandomChunksOfEveryDTypeLayoutAndForm) {
  uint64_t seed = 1;
  for (DType dtype : test::kAllDTypes) {
    for (Layout layout : test::kAllLayouts) {
      for (const Form& form : kForms) {
        for (int rep = 0; rep < 3; ++rep, ++seed) {
          SCOPED_TRACE(
              absl::StrCat(test::DTypeTag(dtype), " ", test::LayoutTag(layout), " ", form.name, " seed ", seed));
          const CacheSpec spec = SmallSpec(form.stats, dtype, layout, form.positions, form.score_heads);
          const Tensors tensors = RandomCache(spec, seed);
          CacheAssembler a = MakeAssembler(spec);
          int64_t expected = 0;
          for (const auto& [key, data] : tensors) expected += static_cast<int64_t>(data.size());
          EXPECT_EQ(a.bytes_expected(), expected);
          for (const v1::TensorChunk& c : RandomChunks(tensors, seed * 7919)) {
            ASSERT_OK(a.Add(c));
          }
          EXPECT_EQ(a.bytes_received(), expected);
          // Each tensor rounded up to 4 bytes.
          EXPECT_GE(a.bytes_allocated(), expected);
          EXPECT_LT(a.bytes_allocated(), expected + 4 * static_cast<int64_t>(tensors.size()));
          EXPECT_EQ(a.bytes_allocated() % 4, 0);
          ASSERT_OK(a.Finish());
          EXPECT_TRUE(a.finished());
          ExpectInputEquals(a, tensors);
        }
      }
    }
  }
}

TEST(CacheAssembler, OneTokenOneLayerWholeTensorChunks) {
  CacheSpec spec = SmallSpec(SpecStats::kQueries, DType::kBFloat16, Layout::kNHD);
  spec.layers = 1;
  spec.tokens = 1;
  spec.q_tokens = 1;
  spec.visual_spans = {{0, 1, Modality::kVisual}};
  const Tensors tensors = RandomCache(spec, 42);
  CacheAssembler a = MakeAssembler(spec);
  for (const auto& [key, data] : tensors) ASSERT_OK(a.Add(static_cast<int32_t>(key.first), key.second, 0, data));
  ASSERT_OK(a.Finish());
  ExpectInputEquals(a, tensors);
}

TEST(CacheAssembler, MemoryGrowsWithWhatArrived) {
  const CacheSpec spec = SmallSpec(SpecStats::kQueries);  // fp16 key: 2*7*5*2 = 140 bytes
  CacheAssembler a = MakeAssembler(spec);
  EXPECT_EQ(a.bytes_allocated(), 0);
  EXPECT_EQ(a.bytes_received(), 0);
  ASSERT_OK(a.Add(1, v1::TENSOR_KIND_KEY, 0, std::string(10, 'x')));
  EXPECT_EQ(a.bytes_allocated(), 140);
  EXPECT_EQ(a.bytes_received(), 10);
  ASSERT_OK(a.Add(1, v1::TENSOR_KIND_KEY, 10, std::string(20, 'y')));
  EXPECT_EQ(a.bytes_allocated(), 140);
  EXPECT_EQ(a.bytes_received(), 30);
  EXPECT_EQ(a.tensor(1, v1::TENSOR_KIND_KEY), std::string(10, 'x') + std::string(20, 'y'));
  // query: 6 * 3 * 5 * 2 = 180 bytes; query_positions 12 bytes.
  ASSERT_OK(a.Add(0, v1::TENSOR_KIND_QUERY_POSITIONS, 0, std::string(3, '\0')));
  EXPECT_EQ(a.bytes_allocated(), 140 + 12);
  EXPECT_EQ(a.tensor(0, v1::TENSOR_KIND_VALUE), "");
  EXPECT_EQ(a.tensor(9, v1::TENSOR_KIND_KEY), "");
  EXPECT_EQ(a.tensor(0, static_cast<v1::TensorKind>(40)), "");
  EXPECT_EQ(a.bytes_expected(), 3 * (2 * 140 + 180 + 12));
}

TEST(CacheAssembler, InputIsEmptyBeforeFinish) {
  CacheAssembler a = MakeAssembler(SmallSpec(SpecStats::kQueries));
  EXPECT_TRUE(a.input().layers.empty());
  EXPECT_FALSE(a.finished());
}

TEST(CacheAssembler, CreateRejectsAnInvalidSpec) {
  CacheSpec s = SmallSpec(SpecStats::kQueries);
  s.kv_heads = 0;
  EXPECT_INVALID(CacheAssembler::Create(s).status(), "shape.kv_heads must be > 0, got 0");
  CacheSpec t = SmallSpec(SpecStats::kQueries);
  t.q_tokens = 2 * 7 + 65536 + 1;
  EXPECT_INVALID(CacheAssembler::Create(t).status(), "q_tokens must be in [1, 2 x shape.tokens + 65536 = 65550]");
  t.q_tokens = 8;  // probe rows after the cache: with positions only
  EXPECT_TRUE(CacheAssembler::Create(t).ok());
  t.has_query_positions = false;
  EXPECT_INVALID(CacheAssembler::Create(t).status(), "q_tokens (8) > shape.tokens (7): rows after the cache");
  CacheSpec u = SmallSpec(SpecStats::kPrecomputed);
  u.score_heads = 3;
  EXPECT_INVALID(CacheAssembler::Create(u).status(), "score_heads must be");
  CacheSpec v = SmallSpec(SpecStats::kQueries);
  v.dtype = static_cast<DType>(3);
  EXPECT_INVALID(CacheAssembler::Create(v).status(), "shape.dtype: unknown value 3");
}

TEST(CacheAssembler, LayerOutOfRange) {
  CacheAssembler a = MakeAssembler(SmallSpec(SpecStats::kQueries));
  EXPECT_INVALID(a.Add(3, v1::TENSOR_KIND_KEY, 0, "ab"), "chunk.layer must be in [0, 3), got 3");
  EXPECT_INVALID(a.Add(-1, v1::TENSOR_KIND_KEY, 0, "ab"), "chunk.layer must be in [0, 3), got -1");
  v1::TensorChunk c;
  c.set_layer(1 << 30);
  c.set_tensor(v1::TENSOR_KIND_VALUE);
  c.set_data("a");
  EXPECT_INVALID(a.Add(c), "chunk.layer must be in [0, 3), got 1073741824");
  EXPECT_EQ(a.bytes_received(), 0);
  EXPECT_EQ(a.bytes_allocated(), 0);
}

TEST(CacheAssembler, TensorKindsTheSpecDoesNotCarry) {
  CacheAssembler q = MakeAssembler(SmallSpec(SpecStats::kQueries, DType::kFloat16, Layout::kHND, false));
  EXPECT_INVALID(q.Add(0, v1::TENSOR_KIND_SCORES, 0, "abcd"),
                 "chunk.tensor of layer 0 is scores, which a cache with statistics 'queries' does not carry "
                 "(expected one of: key, value, query)");
  EXPECT_INVALID(q.Add(0, v1::TENSOR_KIND_ENTROPY, 0, "abcd"), "is entropy");
  EXPECT_INVALID(q.Add(0, v1::TENSOR_KIND_QUERY_POSITIONS, 0, "abcd"), "is query_positions");
  EXPECT_INVALID(q.Add(0, v1::TENSOR_KIND_POSITIONS, 0, "abcd"), "is positions");
  EXPECT_INVALID(q.Add(0, v1::TENSOR_KIND_UNSPECIFIED, 0, "abcd"), "is TENSOR_KIND_UNSPECIFIED");
  EXPECT_INVALID(q.Add(2, static_cast<v1::TensorKind>(42), 0, "abcd"), "chunk.tensor of layer 2 is unknown value 42");
  EXPECT_INVALID(q.Add(2, static_cast<v1::TensorKind>(-5), 0, "abcd"), "unknown value -5");
  CacheAssembler p = MakeAssembler(SmallSpec(SpecStats::kPrecomputed));
  EXPECT_INVALID(p.Add(1, v1::TENSOR_KIND_QUERY, 0, "abcd"),
                 "'precomputed' does not carry (expected one of: key, value, scores, entropy)");
  CacheAssembler n = MakeAssembler(SmallSpec(SpecStats::kNone));
  EXPECT_INVALID(n.Add(1, v1::TENSOR_KIND_QUERY, 0, "abcd"), "'none' does not carry (expected one of: key, value)");
  EXPECT_INVALID(n.Add(1, v1::TENSOR_KIND_SCORES, 0, "abcd"), "'none' does not carry");
  EXPECT_EQ(n.bytes_allocated(), 0);
}

TEST(CacheAssembler, EmptyChunk) {
  CacheAssembler a = MakeAssembler(SmallSpec(SpecStats::kQueries));
  EXPECT_INVALID(a.Add(0, v1::TENSOR_KIND_VALUE, 0, ""), "layer 0 value: empty chunk at offset 0");
  ASSERT_OK(a.Add(0, v1::TENSOR_KIND_VALUE, 0, "ab"));
  EXPECT_INVALID(a.Add(0, v1::TENSOR_KIND_VALUE, 2, ""), "layer 0 value: empty chunk at offset 2");
  EXPECT_EQ(a.bytes_received(), 2);
}

TEST(CacheAssembler, ChunksOutOfOrder) {
  CacheAssembler a = MakeAssembler(SmallSpec(SpecStats::kQueries));
  // The first chunk must start at 0.
  EXPECT_INVALID(a.Add(2, v1::TENSOR_KIND_KEY, 4, "abcd"),
                 "layer 2 key: chunk at offset 4, expected offset 0 (the chunks of a tensor arrive in order)");
  EXPECT_EQ(a.bytes_allocated(), 0);  // nothing allocated for a rejected chunk
  ASSERT_OK(a.Add(2, v1::TENSOR_KIND_KEY, 0, "abcd"));
  // A gap.
  EXPECT_INVALID(a.Add(2, v1::TENSOR_KIND_KEY, 6, "ef"), "layer 2 key: chunk at offset 6, expected offset 4");
  // An overlap.
  EXPECT_INVALID(a.Add(2, v1::TENSOR_KIND_KEY, 2, "ef"), "layer 2 key: chunk at offset 2, expected offset 4");
  EXPECT_INVALID(a.Add(2, v1::TENSOR_KIND_KEY, -1, "ef"), "chunk at offset -1, expected offset 4");
  ASSERT_OK(a.Add(2, v1::TENSOR_KIND_KEY, 4, "ef"));
  EXPECT_EQ(a.tensor(2, v1::TENSOR_KIND_KEY), "abcdef");
}

TEST(CacheAssembler, DataPastTheEnd) {
  CacheAssembler a = MakeAssembler(SmallSpec(SpecStats::kQueries));  // key: 140 bytes
  EXPECT_INVALID(a.Add(0, v1::TENSOR_KIND_KEY, 0, std::string(141, 'k')),
                 "layer 0 key: chunk [0, 141) runs past the tensor's end (140 bytes)");
  EXPECT_EQ(a.bytes_allocated(), 0);
  ASSERT_OK(a.Add(0, v1::TENSOR_KIND_KEY, 0, std::string(100, 'k')));
  EXPECT_INVALID(a.Add(0, v1::TENSOR_KIND_KEY, 100, std::string(41, 'k')),
                 "layer 0 key: chunk [100, 141) runs past the tensor's end (140 bytes)");
  EXPECT_EQ(a.bytes_received(), 100);
  ASSERT_OK(a.Add(0, v1::TENSOR_KIND_KEY, 100, std::string(40, 'k')));
  // Entropy is 4 bytes.
  CacheAssembler p = MakeAssembler(SmallSpec(SpecStats::kPrecomputed));
  EXPECT_INVALID(p.Add(1, v1::TENSOR_KIND_ENTROPY, 0, "12345"),
                 "layer 1 entropy: chunk [0, 5) runs past the "
                 "tensor's end (4 bytes)");
}

TEST(CacheAssembler, TensorSentTwice) {
  CacheAssembler a = MakeAssembler(SmallSpec(SpecStats::kPrecomputed));
  const float e = 1.5f;
  const std::string bytes(reinterpret_cast<const char*>(&e), 4);
  ASSERT_OK(a.Add(1, v1::TENSOR_KIND_ENTROPY, 0, bytes));
  EXPECT_INVALID(a.Add(1, v1::TENSOR_KIND_ENTROPY, 0, bytes),
                 "layer 1 entropy was already received (4 bytes); each tensor is sent once");
  EXPECT_INVALID(a.Add(1, v1::TENSOR_KIND_ENTROPY, 4, bytes), "layer 1 entropy was already received");
  EXPECT_INVALID(a.Add(1, v1::TENSOR_KIND_ENTROPY, 4, ""), "layer 1 entropy was already received");
  EXPECT_EQ(a.bytes_received(), 4);
}

// Sends every tensor of `tensors` except `skip`, of which only `partial` bytes.
void SendAllBut(CacheAssembler& a, const Tensors& tensors, std::pair<int64_t, v1::TensorKind> skip, int64_t partial) {
  for (const auto& [key, data] : tensors) {
    const std::string part = key == skip ? data.substr(0, static_cast<size_t>(partial)) : data;
    if (!part.empty()) ASSERT_OK(a.Add(static_cast<int32_t>(key.first), key.second, 0, part));
  }
}

TEST(CacheAssembler, FinishWithAMissingTensor) {
  const CacheSpec spec = SmallSpec(SpecStats::kQueries);
  const Tensors tensors = RandomCache(spec, 3);
  CacheAssembler a = MakeAssembler(spec);
  SendAllBut(a, tensors, {1, v1::TENSOR_KIND_VALUE}, 0);
  EXPECT_INVALID(a.Finish(), "layer 1 value is missing: 0 of 140 bytes arrived");
  EXPECT_FALSE(a.finished());
  EXPECT_TRUE(a.input().layers.empty());
  // Completing it makes Finish succeed.
  ASSERT_OK(a.Add(1, v1::TENSOR_KIND_VALUE, 0, tensors.at({1, v1::TENSOR_KIND_VALUE})));
  ASSERT_OK(a.Finish());
  ExpectInputEquals(a, tensors);
}

TEST(CacheAssembler, FinishWithAnIncompleteTensor) {
  const CacheSpec spec = SmallSpec(SpecStats::kQueries);
  const Tensors tensors = RandomCache(spec, 4);
  CacheAssembler a = MakeAssembler(spec);
  SendAllBut(a, tensors, {2, v1::TENSOR_KIND_QUERY_POSITIONS}, 5);
  EXPECT_INVALID(a.Finish(), "layer 2 query_positions is incomplete: 5 of 12 bytes arrived");
}

TEST(CacheAssembler, FinishNamesTheFirstIncompleteTensor) {
  const CacheSpec spec = SmallSpec(SpecStats::kPrecomputed);
  CacheAssembler a = MakeAssembler(spec);
  EXPECT_INVALID(a.Finish(), "layer 0 key is missing: 0 of 140 bytes arrived");
  const Tensors tensors = RandomCache(spec, 5);
  SendAllBut(a, tensors, {2, v1::TENSOR_KIND_SCORES}, 0);
  EXPECT_INVALID(a.Finish(), "layer 2 scores is missing: 0 of 56 bytes arrived");
}

TEST(CacheAssembler, FinishRejectsQueryPositionsOutOfRange) {
  const CacheSpec spec = SmallSpec(SpecStats::kQueries);
  Tensors tensors = RandomCache(spec, 6);
  const int32_t bad = 2 * 7 + 65536;  // tokens = 7: a probe may stand up to 2 x 7 + 65536 - 1
  std::memcpy(&tensors[{1, v1::TENSOR_KIND_QUERY_POSITIONS}][4], &bad, 4);
  CacheAssembler a = MakeAssembler(spec);
  SendAllBut(a, tensors, {-1, v1::TENSOR_KIND_UNSPECIFIED}, 0);
  EXPECT_INVALID(a.Finish(), "layer 1 query_positions[1] is 65550, outside [0, 2 x tokens + 65536 = 65550)");
  EXPECT_FALSE(a.finished());
}

TEST(CacheAssembler, QueryOutsideLseArrivesAndIsChecked) {
  CacheSpec spec = SmallSpec(SpecStats::kQueries, DType::kBFloat16, Layout::kNHD);
  spec.has_query_outside_lse = true;
  Tensors tensors = RandomCache(spec, 12);
  {
    CacheAssembler a = MakeAssembler(spec);
    SendAllBut(a, tensors, {-1, v1::TENSOR_KIND_UNSPECIFIED}, 0);
    ASSERT_OK(a.Finish());
    ExpectInputEquals(a, tensors);
  }
  {
    CacheAssembler a = MakeAssembler(spec);
    SendAllBut(a, tensors, {1, v1::TENSOR_KIND_QUERY_OUTSIDE_LSE}, 10);
    EXPECT_INVALID(a.Finish(), "layer 1 query_outside_lse is incomplete: 10 of 72 bytes arrived");
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(&tensors[{2, v1::TENSOR_KIND_QUERY_OUTSIDE_LSE}][4 * 4], &nan, 4);  // query head 1, row 1
  CacheAssembler a = MakeAssembler(spec);
  SendAllBut(a, tensors, {-1, v1::TENSOR_KIND_UNSPECIFIED}, 0);
  EXPECT_INVALID(a.Finish(), "layer 2 query_outside_lse[1, 1] is nan");
  // Not a tensor of a request without it.
  CacheAssembler b = MakeAssembler(SmallSpec(SpecStats::kQueries));
  EXPECT_INVALID(b.Add(0, v1::TENSOR_KIND_QUERY_OUTSIDE_LSE, 0, "abcd"), "query_outside_lse");
}

TEST(CacheAssembler, FinishRejectsNonFiniteEntropy) {
  for (float e : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    const CacheSpec spec = SmallSpec(SpecStats::kPrecomputed);
    Tensors tensors = RandomCache(spec, 7);
    std::memcpy(tensors[{2, v1::TENSOR_KIND_ENTROPY}].data(), &e, 4);
    CacheAssembler a = MakeAssembler(spec);
    SendAllBut(a, tensors, {-1, v1::TENSOR_KIND_UNSPECIFIED}, 0);
    EXPECT_INVALID(a.Finish(), "layer 2 entropy is not finite");
  }
}

// Found by tests/fuzz/fuzz_assembler (corpus/fuzz_assembler/crash-nan-scores):
// non-finite scores passed Finish and failed only in the compression.
TEST(CacheAssembler, FinishRejectsNonFiniteScores) {
  for (float x : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
    const CacheSpec spec = SmallSpec(SpecStats::kPrecomputed);
    Tensors tensors = RandomCache(spec, 8);
    std::memcpy(&tensors[{1, v1::TENSOR_KIND_SCORES}][4 * 9], &x, 4);  // head 1, token 2 (tokens = 7)
    CacheAssembler a = MakeAssembler(spec);
    SendAllBut(a, tensors, {-1, v1::TENSOR_KIND_UNSPECIFIED}, 0);
    EXPECT_INVALID(a.Finish(), "layer 1 scores: value at head 1, token 2 is not finite");
    EXPECT_FALSE(a.finished());
  }
}

TEST(CacheAssembler, AddAfterFinishAndFinishTwice) {
  const CacheSpec spec = SmallSpec(SpecStats::kNone);
  const Tensors tensors = RandomCache(spec, 8);
  CacheAssembler a = MakeAssembler(spec);
  SendAllBut(a, tensors, {-1, v1::TENSOR_KIND_UNSPECIFIED}, 0);
  ASSERT_OK(a.Finish());
  EXPECT_TRUE(a.Finish().ok());
  EXPECT_STATUS(a.Add(0, v1::TENSOR_KIND_KEY, 0, "x"), absl::StatusCode::kFailedPrecondition,
                "after the cache was complete");
  ExpectInputEquals(a, tensors);
}

TEST(CacheAssembler, ViewsSurviveAMove) {
  const CacheSpec spec = SmallSpec(SpecStats::kPrecomputed, DType::kFloat32, Layout::kNHD);
  const Tensors tensors = RandomCache(spec, 9);
  CacheAssembler a = MakeAssembler(spec);
  SendAllBut(a, tensors, {-1, v1::TENSOR_KIND_UNSPECIFIED}, 0);
  ASSERT_OK(a.Finish());
  CacheAssembler b = std::move(a);
  ExpectInputEquals(b, tensors);
  CacheAssembler c = MakeAssembler(SmallSpec(SpecStats::kNone));
  c = std::move(b);
  ExpectInputEquals(c, tensors);
  EXPECT_EQ(c.bytes_received(), c.bytes_expected());
}

// Random chunk sequences: every Add's verdict matches a model of what each
// tensor has received; nothing crashes; the counters stay consistent.
TEST(CacheAssembler, RandomChunkSequencesMatchAModel) {
  Rng rng(77);
  for (const Form& form : kForms) {
    SCOPED_TRACE(form.name);
    const CacheSpec spec = SmallSpec(form.stats, DType::kFloat16, Layout::kHND, form.positions, form.score_heads);
    CacheAssembler a = MakeAssembler(spec);
    std::map<std::pair<int64_t, int>, int64_t> received;
    int64_t total = 0;
    for (int i = 0; i < 5000; ++i) {
      const auto layer = static_cast<int32_t>(rng.Int(-1, spec.layers));
      const auto kind = static_cast<v1::TensorKind>(rng.Int(-1, 8));
      const bool carried = layer >= 0 && layer < spec.layers && kind >= v1::TENSOR_KIND_KEY &&
                           kind <= v1::TENSOR_KIND_ENTROPY && TensorBytes(spec, kind) > 0;
      const int64_t expected = carried ? TensorBytes(spec, kind) : 0;
      int64_t& got = received[{layer, static_cast<int>(kind)}];
      const int64_t offset = rng.Int(0, 3) == 0 ? rng.Int(-2, 200) : got;
      const std::string data(static_cast<size_t>(rng.Int(0, 3) == 0 ? rng.Int(0, 200) : rng.Int(0, 8)),
                             '\0');  // zeros: valid positions and entropy
      const bool ok = carried && !data.empty() && got < expected && offset == got &&
                      static_cast<int64_t>(data.size()) <= expected - got;
      const absl::Status st = a.Add(layer, kind, offset, data);
      ASSERT_EQ(st.ok(), ok) << st << " layer " << layer << " kind " << kind << " offset " << offset << " size "
                             << data.size() << " received " << got << " of " << expected;
      if (ok) {
        got += static_cast<int64_t>(data.size());
        total += static_cast<int64_t>(data.size());
      } else {
        EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
      }
      ASSERT_EQ(a.bytes_received(), total);
      ASSERT_LE(a.bytes_allocated(), a.bytes_expected() + 4 * spec.layers * 6);
    }
    // Finish succeeds only when every tensor is complete.
    const absl::Status fin = a.Finish();
    EXPECT_EQ(fin.ok(), a.bytes_received() == a.bytes_expected()) << fin;
  }
}

// The assembled input compresses exactly like the original views.
TEST(CacheAssembler, AssembledInputCompressesLikeTheOriginal) {
  auto backend = MakeCpuBackend();
  for (const Form& form : kForms) {
    if (form.stats == SpecStats::kNone) continue;
    SCOPED_TRACE(form.name);
    CacheSpec spec = SmallSpec(form.stats, DType::kFloat16, Layout::kNHD, form.positions, form.score_heads);
    spec.tokens = 33;
    spec.q_tokens = form.stats == SpecStats::kQueries ? 9 : 0;
    spec.visual_spans = {{10, 10, Modality::kVisual}};
    const Tensors tensors = RandomCache(spec, 11);
    CacheAssembler a = MakeAssembler(spec);
    for (const v1::TensorChunk& c : RandomChunks(tensors, 12)) ASSERT_OK(a.Add(c));
    ASSERT_OK(a.Finish());

    // The same cache from the original bytes, built by hand.
    std::vector<std::vector<uint32_t>> storage;
    auto keep = [&](const std::string& bytes) {
      std::vector<uint32_t>& s = storage.emplace_back((bytes.size() + 3) / 4);
      std::memcpy(s.data(), bytes.data(), bytes.size());
      return static_cast<const void*>(s.data());
    };
    storage.reserve(64);
    CacheInput in;
    in.kv_heads = spec.kv_heads;
    in.q_heads = spec.q_heads;
    in.head_dim = spec.head_dim;
    in.tokens = spec.tokens;
    in.dtype = spec.dtype;
    in.layout = spec.layout;
    in.modality = ModalityVector(spec);
    in.stats = form.stats == SpecStats::kQueries ? StatsForm::kQueries : StatsForm::kPrecomputed;
    for (int64_t l = 0; l < spec.layers; ++l) {
      LayerInput layer;
      auto view = [&](v1::TensorKind k, int64_t heads, int64_t tokens) {
        return TensorView{keep(tensors.at({l, k})), spec.dtype, spec.layout, heads, tokens, spec.head_dim};
      };
      layer.key = view(v1::TENSOR_KIND_KEY, spec.kv_heads, spec.tokens);
      layer.value = view(v1::TENSOR_KIND_VALUE, spec.kv_heads, spec.tokens);
      if (form.stats == SpecStats::kQueries) {
        layer.query = view(v1::TENSOR_KIND_QUERY, spec.q_heads, spec.q_tokens);
        if (form.positions) {
          const std::string& p = tensors.at({l, v1::TENSOR_KIND_QUERY_POSITIONS});
          layer.query_positions.resize(p.size() / 4);
          std::memcpy(layer.query_positions.data(), p.data(), p.size());
        }
      } else {
        layer.scores = static_cast<const float*>(keep(tensors.at({l, v1::TENSOR_KIND_SCORES})));
        layer.score_heads = spec.score_heads;
        std::memcpy(&layer.entropy, tensors.at({l, v1::TENSOR_KIND_ENTROPY}).data(), 4);
      }
      in.layers.push_back(std::move(layer));
    }
    CompressOptions o = DefaultOptions(PolicyKind::kMeda);
    o.budget.rho = 0.4;
    absl::StatusOr<CompressResult> want = Compress(in, o, *backend);
    absl::StatusOr<CompressResult> got = Compress(a.input(), o, *backend);
    ASSERT_TRUE(want.ok()) << want.status();
    ASSERT_TRUE(got.ok()) << got.status();
    ASSERT_EQ(got->layers.size(), want->layers.size());
    for (size_t l = 0; l < want->layers.size(); ++l) {
      EXPECT_EQ(got->layers[l].budget, want->layers[l].budget);
      EXPECT_EQ(got->layers[l].positions, want->layers[l].positions);
      EXPECT_EQ(got->layers[l].key, want->layers[l].key);
      EXPECT_EQ(got->layers[l].value, want->layers[l].value);
      EXPECT_EQ(got->layers[l].entropy, want->layers[l].entropy);
    }
  }
}

}  // namespace
}  // namespace medakv
