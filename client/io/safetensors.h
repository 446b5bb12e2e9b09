// Reading and writing the safetensors format
// (https://github.com/huggingface/safetensors).
//
// A safetensors file is
//   - an 8-byte little-endian unsigned integer N,
//   - N bytes of UTF-8 JSON: an object mapping each tensor name to
//       {"dtype": "F16", "shape": [2, 3], "data_offsets": [begin, end]}
//     (offsets relative to the start of the data buffer) plus an optional
//     "__metadata__" object of string values,
//   - the data buffer: the tensors' bytes, row-major, little-endian, covering
//     the buffer completely with no overlaps and no gaps.
//
// File::Open maps the file read-only and validates the header completely
// before returning; the tensors' bytes are then accessed without copies.
// Writer assembles a file from caller-owned buffers, again without copies.
//
// Every function reports errors through absl::Status; nothing throws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace medakv::safetensors {

// The element types this library reads and writes. The format also defines
// 8-bit and sub-byte float types and complex types; files using them are
// rejected as unsupported.
enum class ElementType {
  kF16,
  kBF16,
  kF32,
  kF64,
  kI8,
  kU8,
  kI16,
  kU16,
  kI32,
  kU32,
  kI64,
  kU64,
  kBool
};

// The spec's name of `type`: "F16", "BF16", "F32", "F64", "I8", "U8", "I16",
// "U16", "I32", "U32", "I64", "U64", "BOOL". "INVALID" for a value outside the
// enumeration.
const char* ElementTypeName(ElementType type);

// The inverse of ElementTypeName (case-sensitive, as in the spec).
// InvalidArgument for any other string.
[[nodiscard]] absl::StatusOr<ElementType> ParseElementType(absl::string_view name);

// Bytes per element: 2, 2, 4, 8, 1, 1, 2, 2, 4, 4, 8, 8, 1. 0 for a value
// outside the enumeration.
int ElementSize(ElementType type);

// The largest header File accepts and Writer produces (as the reference
// implementation: 100 MiB).
inline constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;

// One tensor of a File.
struct TensorInfo {
  std::string name;
  ElementType type;
  // [] is a scalar (one element); any dimension may be 0. All dimensions are
  // non-negative and the product of the non-zero ones fits in int64_t.
  std::vector<int64_t> shape;
  // The tensor's bytes inside the File's buffer; valid as long as the File
  // (moving the File keeps them valid). Not necessarily aligned to the element
  // size: the format does not require it. May be nullptr when size_bytes is 0.
  const uint8_t* data;
  // == NumElements() * ElementSize(type).
  size_t size_bytes;

  // The product of `shape` (1 for a scalar).
  int64_t NumElements() const;
};

// A validated, read-only safetensors file. Move-only.
class File {
 public:
  // Maps the file at `path` read-only and validates it. Errors:
  //   - NotFound, PermissionDenied, ... (from errno) when it cannot be opened,
  //     with the path and strerror in the message;
  //   - InvalidArgument, with a message starting "PATH: ", when it is not a
  //     regular file or not a valid safetensors file.
  // The mapping is shared with the file: truncating the file while it is
  // mapped makes later accesses to its tensors fault (SIGBUS), as with any
  // mmap(2) reader.
  [[nodiscard]] static absl::StatusOr<File> Open(const std::string& path);

  // Validates an in-memory file exactly as Open does; messages start with
  // "<bytes>: ". Takes ownership of `bytes`; costs one header parse.
  [[nodiscard]] static absl::StatusOr<File> FromBytes(std::string bytes);

  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File();

  // The tensor called `name`, nullptr if there is none. O(log n).
  const TensorInfo* Find(absl::string_view name) const;

  // All tensors, in increasing order of their offset in the data buffer.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }

  // The "__metadata__" entries (empty when the file has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  File() = default;

  // Parses and validates `size` bytes at `bytes`, which must stay at the same
  // address for the File's lifetime; `origin` prefixes error messages.
  [[nodiscard]] static absl::StatusOr<File> Parse(absl::string_view origin, const uint8_t* bytes,
                                                  size_t size);
  void Reset();

  // Exactly one of these holds the bytes (neither for a moved-from File).
  void* mapping_ = nullptr;  // mmap(2)ed by Open
  size_t mapping_size_ = 0;
  std::unique_ptr<std::string> owned_;  // from FromBytes; heap-held so data pointers survive moves

  std::vector<TensorInfo> tensors_;
  std::vector<size_t> by_name_;  // indices into tensors_, sorted by name
  std::map<std::string, std::string> metadata_;
};

// Assembles a safetensors file. The header lists the tensors (and the
// metadata first, when there is any) and is padded with spaces so that the
// data buffer starts at a multiple of 8 bytes; the data buffer holds the
// tensors in the order they were added.
class Writer {
 public:
  // Adds a tensor. The Writer does not copy: `data` must stay alive and
  // unchanged until the last WriteFile or Serialize call. InvalidArgument when
  // `name` is a duplicate, "__metadata__", or not valid UTF-8; `type` is not
  // an ElementType; a dimension is negative; the element or byte count
  // overflows int64_t; or data.size() != product(shape) * ElementSize(type).
  [[nodiscard]] absl::Status Add(std::string name, ElementType type, std::vector<int64_t> shape,
                                 absl::Span<const uint8_t> data);

  // Sets a "__metadata__" entry, replacing any earlier value for `key`. Keys
  // and values must be valid UTF-8; WriteFile and Serialize report an
  // InvalidArgument otherwise.
  void SetMetadata(std::string key, std::string value);

  // Writes the file to "PATH.tmp.<pid>", flushes it to disk and renames it to
  // `path`, so `path` either keeps its old contents or gets the complete new
  // ones; the temporary file is removed on failure. Errors carry the path and
  // strerror, with the errno's status code (NotFound for a missing directory).
  // Concurrent WriteFile calls for the same path from one process race.
  [[nodiscard]] absl::Status WriteFile(const std::string& path) const;

  // The whole file in memory.
  [[nodiscard]] absl::StatusOr<std::string> Serialize() const;

 private:
  struct Entry {
    std::string name;
    ElementType type;
    std::vector<int64_t> shape;
    absl::Span<const uint8_t> data;
  };

  // The length prefix plus the padded header.
  [[nodiscard]] absl::StatusOr<std::string> Prefix() const;

  std::vector<Entry> entries_;
  std::set<std::string> names_;  // of entries_, to reject duplicates
  std::map<std::string, std::string> metadata_;
};

}  // namespace medakv::safetensors
