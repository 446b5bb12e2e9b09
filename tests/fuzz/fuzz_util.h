// Helpers shared by the fuzz targets: invariant checks that fail the input
// (libFuzzer saves it as a crash), and status-code checks.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "service/compress/options.h"
#include "service/compress/pipeline.h"

namespace medakv::fuzz {

[[noreturn]] inline void Fail(const char* file, int line, const char* condition, const std::string& what) {
  std::fprintf(stderr, "%s:%d: fuzz invariant failed: %s\n  %s\n", file, line, condition, what.c_str());
  std::fflush(stderr);
  std::abort();
}

inline bool CodeIn(const absl::Status& s, std::initializer_list<absl::StatusCode> codes) {
  for (absl::StatusCode c : codes) {
    if (s.code() == c) return true;
  }
  return false;
}

}  // namespace medakv::fuzz

// Aborts with the condition and the message (absl::StrCat of the rest) when
// `cond` is false.
#define MEDAKV_FUZZ_CHECK(cond, ...)                                                  \
  do {                                                                                \
    if (!(cond)) ::medakv::fuzz::Fail(__FILE__, __LINE__, #cond, absl::StrCat(__VA_ARGS__)); \
  } while (false)

// `status` has one of the listed codes (OK included only if listed).
#define MEDAKV_FUZZ_CHECK_CODE(status, ...)                                                   \
  do {                                                                                        \
    const absl::Status& fuzz_status_ = (status);                                              \
    if (!::medakv::fuzz::CodeIn(fuzz_status_, {__VA_ARGS__}))                                 \
      ::medakv::fuzz::Fail(__FILE__, __LINE__, #status " has an unexpected code",            \
                           fuzz_status_.ToString());                                          \
  } while (false)

namespace medakv::fuzz {

// What every compression result satisfies: one LayerResult per layer, budgets
// in [1, tokens] (tokens for `full`), per head strictly ascending positions
// inside [0, tokens), outputs of kv_heads * budget * head_dim elements.
inline void CheckResult(const CompressResult& r, const CacheInput& in, const CompressOptions& o) {
  const int64_t layers = static_cast<int64_t>(in.layers.size());
  MEDAKV_FUZZ_CHECK(static_cast<int64_t>(r.layers.size()) == layers, "result has ", r.layers.size(), " layers");
  MEDAKV_FUZZ_CHECK(r.tokens_in == layers * in.tokens, "tokens_in ", r.tokens_in);
  int64_t kept = 0;
  const int64_t esize = DTypeSize(in.dtype);
  for (int64_t l = 0; l < layers; ++l) {
    const LayerResult& lr = r.layers[l];
    MEDAKV_FUZZ_CHECK(lr.budget >= 1 && lr.budget <= in.tokens, "layer ", l, " budget ", lr.budget, " of ",
                      in.tokens, " tokens");
    if (o.policy == PolicyKind::kFull) MEDAKV_FUZZ_CHECK(lr.budget == in.tokens, "full kept ", lr.budget);
    kept += lr.budget;
    MEDAKV_FUZZ_CHECK(static_cast<int64_t>(lr.positions.size()) == in.kv_heads * lr.budget, "positions size");
    const auto bytes = static_cast<size_t>(in.kv_heads * lr.budget * in.head_dim * esize);
    MEDAKV_FUZZ_CHECK(lr.key.size() == bytes && lr.value.size() == bytes, "layer ", l, " output of ",
                      lr.key.size(), "/", lr.value.size(), " bytes, expected ", bytes);
    for (int64_t h = 0; h < in.kv_heads; ++h) {
      for (int64_t i = 0; i < lr.budget; ++i) {
        const int32_t p = lr.positions[h * lr.budget + i];
        MEDAKV_FUZZ_CHECK(p >= 0 && p < in.tokens, "layer ", l, " head ", h, " position ", p);
        if (i > 0) {
          MEDAKV_FUZZ_CHECK(p > lr.positions[h * lr.budget + i - 1], "layer ", l, " head ", h,
                            ": positions not strictly ascending at ", i);
        }
      }
    }
    MEDAKV_FUZZ_CHECK(std::isfinite(lr.alpha), "layer ", l, " alpha ", lr.alpha);
  }
  MEDAKV_FUZZ_CHECK(r.tokens_kept == kept, "tokens_kept ", r.tokens_kept, ", budgets sum to ", kept);
}

}  // namespace medakv::fuzz
