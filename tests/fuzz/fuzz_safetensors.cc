// Fuzz target: the safetensors reader (client/io/safetensors.h) and the
// medakv cache-file loader on top of it (client/cli/cache_file.h).
//
// Input: the bytes of a file. Seeds: small caches written by `medakv synth`
// (both statistics forms, every dtype) and hand-made edge files (README.md).
//
// Invariants:
//   - File::FromBytes and File::Open (of the same bytes in a memfd) agree:
//     both accept, or both reject with the same code and message after the
//     origin prefix; nothing but INVALID_ARGUMENT for bad bytes.
//   - An accepted file's tensors lie inside its data buffer, in offset order,
//     tiling it, each of NumElements * ElementSize bytes; Find finds each.
//   - Round trip: a Writer given the tensors and the metadata serializes a
//     file that parses back to the same names, types, shapes, bytes and
//     metadata, and serializing that again gives the same bytes.
//   - LoadCache (HND and NHD) accepts only what ValidateCacheInput accepts,
//     uses every tensor of the file (none silently ignored), and its views
//     have the sizes of their tensors and hold their bytes; a tiny loaded
//     cache compresses with every result invariant of fuzz_util.h.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "client/cli/cache_file.h"
#include "client/io/safetensors.h"
#include "fuzz_util.h"
#include "kernels/backend.h"
#include "service/compress/options.h"
#include "service/compress/pipeline.h"

namespace medakv {
namespace {

using safetensors::File;
using safetensors::TensorInfo;

constexpr int64_t kMaxCompressElements = 4096;

const Backend& Cpu() {
  static const Backend* backend = MakeCpuBackend().release();
  return *backend;
}

absl::string_view Bytes(const TensorInfo& t) {
  return absl::string_view(reinterpret_cast<const char*>(t.data), t.size_bytes);
}

// The message without its "ORIGIN: " prefix.
absl::string_view AfterOrigin(const absl::Status& s, absl::string_view origin) {
  absl::string_view m = s.message();
  if (absl::ConsumePrefix(&m, origin)) absl::ConsumePrefix(&m, ": ");
  return m;
}

// File::Open of the same bytes, through a memfd.
void CheckOpenAgrees(const std::string& bytes, const absl::StatusOr<File>& from_bytes) {
  const int fd = memfd_create("medakv-fuzz-safetensors", MFD_CLOEXEC);
  MEDAKV_FUZZ_CHECK(fd >= 0, "memfd_create: ", std::strerror(errno));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    MEDAKV_FUZZ_CHECK(n > 0, "write to the memfd: ", std::strerror(errno));
    done += static_cast<size_t>(n);
  }
  const std::string path = absl::StrCat("/proc/self/fd/", fd);
  absl::StatusOr<File> opened = File::Open(path);
  close(fd);
  MEDAKV_FUZZ_CHECK(opened.ok() == from_bytes.ok(), "Open: ", opened.status().ToString(),
                    ", FromBytes: ", from_bytes.status().ToString());
  if (!opened.ok()) {
    MEDAKV_FUZZ_CHECK(opened.status().code() == from_bytes.status().code() &&
                          AfterOrigin(opened.status(), path) == AfterOrigin(from_bytes.status(), "<bytes>"),
                      "Open: ", opened.status().ToString(), ", FromBytes: ", from_bytes.status().ToString());
    return;
  }
  MEDAKV_FUZZ_CHECK(opened->tensors().size() == from_bytes->tensors().size(), "Open and FromBytes differ");
  for (size_t i = 0; i < opened->tensors().size(); ++i) {
    const TensorInfo& a = opened->tensors()[i];
    const TensorInfo& b = from_bytes->tensors()[i];
    MEDAKV_FUZZ_CHECK(a.name == b.name && a.type == b.type && a.shape == b.shape && Bytes(a) == Bytes(b),
                      "tensor ", i, " differs between Open and FromBytes");
  }
  MEDAKV_FUZZ_CHECK(opened->metadata() == from_bytes->metadata(), "metadata differ between Open and FromBytes");
}

void CheckFile(const File& f, const std::string& bytes) {
  uint64_t header = 0;
  for (int i = 0; i < 8; ++i) header |= uint64_t{static_cast<uint8_t>(bytes[i])} << (8 * i);
  size_t offset = 8 + header;  // of the next tensor in `bytes`
  const uint8_t* next = nullptr;  // where it must start in the File's buffer
  for (const TensorInfo& t : f.tensors()) {
    const int esize = safetensors::ElementSize(t.type);
    MEDAKV_FUZZ_CHECK(esize > 0, "tensor ", t.name, ": bad type");
    int64_t elements = 1;
    bool empty = false;
    for (int64_t d : t.shape) {
      MEDAKV_FUZZ_CHECK(d >= 0, "tensor ", t.name, ": negative dimension");
      if (d == 0) {
        empty = true;
      } else {
        MEDAKV_FUZZ_CHECK(!__builtin_mul_overflow(elements, d, &elements), "tensor ", t.name, ": overflow");
      }
    }
    if (empty) elements = 0;
    MEDAKV_FUZZ_CHECK(t.NumElements() == elements, "tensor ", t.name, ": NumElements ", t.NumElements(), " vs ",
                      elements);
    MEDAKV_FUZZ_CHECK(static_cast<int64_t>(t.size_bytes) == elements * esize, "tensor ", t.name, ": ",
                      t.size_bytes, " bytes for ", elements, " elements");
    if (t.size_bytes == 0) continue;
    MEDAKV_FUZZ_CHECK(t.size_bytes <= bytes.size() - offset &&
                          Bytes(t) == absl::string_view(bytes).substr(offset, t.size_bytes),
                      "tensor ", t.name, " does not hold the bytes where the tiling puts it");
    MEDAKV_FUZZ_CHECK(next == nullptr || t.data == next, "tensor ", t.name, " does not follow the previous one");
    offset += t.size_bytes;
    next = t.data + t.size_bytes;
  }
  for (const TensorInfo& t : f.tensors()) {
    MEDAKV_FUZZ_CHECK(f.Find(t.name) == &t, "Find(", t.name, ")");
  }
  MEDAKV_FUZZ_CHECK(offset == bytes.size(), "the tensors end ", bytes.size() - offset, " bytes before the file");
}

// The File through a Writer and back: the same file.
std::string RoundTrip(const File& f) {
  safetensors::Writer w;
  for (const TensorInfo& t : f.tensors()) {
    const absl::Status s =
        w.Add(t.name, t.type, t.shape, absl::Span<const uint8_t>(t.data, t.size_bytes));
    MEDAKV_FUZZ_CHECK(s.ok(), "Writer rejects a tensor the reader accepted: ", s.ToString());
  }
  for (const auto& [key, value] : f.metadata()) w.SetMetadata(key, value);
  absl::StatusOr<std::string> out = w.Serialize();
  MEDAKV_FUZZ_CHECK(out.ok(), "Writer cannot serialize what the reader accepted: ", out.status().ToString());
  return *std::move(out);
}

void CheckSameFile(const File& a, const File& b) {
  MEDAKV_FUZZ_CHECK(a.tensors().size() == b.tensors().size(), "round trip: ", a.tensors().size(), " tensors -> ",
                    b.tensors().size());
  for (const TensorInfo& t : a.tensors()) {
    const TensorInfo* u = b.Find(t.name);
    MEDAKV_FUZZ_CHECK(u != nullptr && u->type == t.type && u->shape == t.shape && Bytes(*u) == Bytes(t),
                      "round trip changed tensor ", t.name);
  }
  MEDAKV_FUZZ_CHECK(a.metadata() == b.metadata(), "round trip changed the metadata");
}

// The tensors LoadCache must have used, by name.
size_t UsedTensors(const LoadedCache& c) {
  const CacheInput& in = c.input;
  size_t used = in.modality.empty() ? 0 : 1;
  for (size_t l = 0; l < in.layers.size(); ++l) {
    used += 2;
    if (in.stats == StatsForm::kQueries) {
      used += 1 + (c.file.Find(absl::StrCat("layer.", l, ".query_positions")) != nullptr ? 1 : 0);
    } else {
      used += 2;
    }
  }
  return used;
}

void CheckLoad(File file, Layout layout, size_t input_size) {
  const size_t tensors = file.tensors().size();
  absl::StatusOr<std::unique_ptr<LoadedCache>> loaded = LoadCache(std::move(file), layout);
  if (!loaded.ok()) {
    MEDAKV_FUZZ_CHECK_CODE(loaded.status(), absl::StatusCode::kInvalidArgument);
    return;
  }
  const LoadedCache& c = **loaded;
  const CacheInput& in = c.input;
  const absl::Status valid = ValidateCacheInput(in);
  MEDAKV_FUZZ_CHECK(valid.ok(), "LoadCache accepted an input ValidateCacheInput rejects: ", valid.ToString());
  MEDAKV_FUZZ_CHECK(UsedTensors(c) == tensors, "LoadCache used ", UsedTensors(c), " of the file's ", tensors,
                    " tensors (one is silently ignored)");
  for (size_t l = 0; l < in.layers.size(); ++l) {
    const LayerInput& layer = in.layers[l];
    const auto same = [&](const TensorView& v, const char* what) {
      const TensorInfo* t = c.file.Find(absl::StrCat("layer.", l, ".", what));
      MEDAKV_FUZZ_CHECK(t != nullptr && v.NumBytes() == static_cast<int64_t>(t->size_bytes) &&
                            std::memcmp(v.data, t->data, t->size_bytes) == 0,
                        "layer ", l, " ", what, ": the view is not the tensor");
    };
    same(layer.key, "key");
    same(layer.value, "value");
    if (in.stats == StatsForm::kQueries) same(layer.query, "query");
  }
  int64_t elements = 0;
  for (const TensorInfo& t : c.file.tensors()) elements += t.NumElements();
  if (elements > kMaxCompressElements) return;
  static constexpr PolicyKind kPolicies[] = {PolicyKind::kMeda,   PolicyKind::kFull,      PolicyKind::kStreamingLlm,
                                             PolicyKind::kH2O,    PolicyKind::kSnapKV,    PolicyKind::kPyramidKV,
                                             PolicyKind::kLookM,  PolicyKind::kAmber};
  const CompressOptions options = DefaultOptions(kPolicies[input_size % 8]);
  absl::StatusOr<CompressResult> result = Compress(in, options, Cpu());
  if (!result.ok()) {
    // A NaN or infinity in the tensors, or finite keys and queries whose dot
    // products overflow float32: a precise INVALID_ARGUMENT.
    const absl::string_view m = result.status().message();
    MEDAKV_FUZZ_CHECK(result.status().code() == absl::StatusCode::kInvalidArgument &&
                          (absl::StrContains(m, "the attention statistics are not finite") ||
                           absl::StrContains(m, "is not finite (")),
                      "Compress of a loaded cache fails: ", result.status().ToString());
    return;
  }
  fuzz::CheckResult(*result, in, options);
}

}  // namespace
}  // namespace medakv

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using medakv::safetensors::File;
  if (size > (size_t{1} << 20)) return -1;
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<File> file = File::FromBytes(bytes);
  if (!file.ok()) {
    MEDAKV_FUZZ_CHECK_CODE(file.status(), absl::StatusCode::kInvalidArgument);
    MEDAKV_FUZZ_CHECK(absl::StartsWith(file.status().message(), "<bytes>: "), file.status().ToString());
  }
  medakv::CheckOpenAgrees(bytes, file);
  if (!file.ok()) return 0;
  medakv::CheckFile(*file, bytes);

  const std::string again_bytes = medakv::RoundTrip(*file);
  absl::StatusOr<File> again = File::FromBytes(again_bytes);
  MEDAKV_FUZZ_CHECK(again.ok(), "the written file does not parse: ", again.status().ToString());
  medakv::CheckSameFile(*file, *again);
  MEDAKV_FUZZ_CHECK(medakv::RoundTrip(*again) == again_bytes, "writing the written file again changes it");

  medakv::CheckLoad(*std::move(file), medakv::Layout::kHND, size);
  medakv::CheckLoad(*std::move(again), medakv::Layout::kNHD, size);
  return 0;
}
