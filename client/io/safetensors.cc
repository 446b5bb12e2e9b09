#include "client/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/common/status.h"
#include "nlohmann/json.hpp"

namespace medakv::safetensors {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

static_assert(sizeof(size_t) == sizeof(uint64_t), "a 64-bit platform is assumed");

constexpr absl::string_view kMetadataKey = "__metadata__";
constexpr size_t kLengthPrefixBytes = 8;
// The deepest JSON nesting accepted in a header. A valid header needs 3
// levels (header object, tensor entry, shape array); the slack tolerates
// unknown fields, which are ignored.
constexpr int kMaxJsonDepth = 32;
// Longest excerpt of a name or JSON value quoted in an error message.
constexpr size_t kMaxQuotedBytes = 120;

struct TypeRow {
  ElementType type;
  const char* name;
  int size;
};

constexpr TypeRow kTypes[] = {
    {ElementType::kF16, "F16", 2},   {ElementType::kBF16, "BF16", 2}, {ElementType::kF32, "F32", 4},
    {ElementType::kF64, "F64", 8},   {ElementType::kI8, "I8", 1},     {ElementType::kU8, "U8", 1},
    {ElementType::kI16, "I16", 2},   {ElementType::kU16, "U16", 2},   {ElementType::kI32, "I32", 4},
    {ElementType::kU32, "U32", 4},   {ElementType::kI64, "I64", 8},   {ElementType::kU64, "U64", 8},
    {ElementType::kBool, "BOOL", 1},
};

const TypeRow* FindType(ElementType type) {
  for (const TypeRow& row : kTypes) {
    if (row.type == type) return &row;
  }
  return nullptr;
}

std::string SupportedTypeNames() {
  std::vector<absl::string_view> names;
  for (const TypeRow& row : kTypes) names.push_back(row.name);
  return absl::StrJoin(names, ", ");
}

// Whether `s` is well-formed UTF-8 (no overlong forms, surrogates or code
// points above U+10FFFF), as JSON requires: nlohmann's strict serializer
// throws on anything else.
bool IsValidUtf8(absl::string_view s) {
  try {
    (void)Json(std::string(s)).dump();
    return true;
  } catch (const Json::type_error&) {
    return false;
  }
}

// `s` for an error message: control characters, (with `escape_quotes`) quotes
// and backslashes, and (when `s` is not valid UTF-8) non-ASCII bytes escaped;
// cut after `max_bytes`.
std::string Printable(absl::string_view s, bool escape_quotes = true,
                      size_t max_bytes = kMaxQuotedBytes) {
  const bool utf8 = IsValidUtf8(s);
  std::string out;
  size_t i = 0;
  for (; i < s.size() && i < max_bytes; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (escape_quotes && (c == '"' || c == '\\')) {
      out.push_back('\\');
      out.push_back(static_cast<char>(c));
    } else if (c < 0x20 || c == 0x7F || (c >= 0x80 && !utf8)) {
      constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xF]);
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  if (i < s.size()) {
    // Do not leave half a UTF-8 sequence before the ellipsis.
    if (utf8) {
      while (!out.empty() && (static_cast<unsigned char>(out.back()) & 0xC0) == 0x80)
        out.pop_back();
      if (!out.empty() && static_cast<unsigned char>(out.back()) >= 0xC0) out.pop_back();
    }
    out += "...";
  }
  return out;
}

std::string Quote(absl::string_view s) { return absl::StrCat("\"", Printable(s), "\""); }

// A JSON value for an error message.
std::string Describe(const Json& value) {
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > kMaxQuotedBytes) {
    text.resize(kMaxQuotedBytes);
    text += "...";
  }
  // JSON text has its control characters escaped already; only cut UTF-8
  // sequences can remain, and Printable escapes those.
  if (IsValidUtf8(text)) return text;
  std::string out;
  for (char c : text) {
    if (static_cast<unsigned char>(c) >= 0x80) {
      out += "?";
    } else {
      out.push_back(c);
    }
  }
  return out;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Computes the element and byte counts of a tensor, requiring every dimension
// to be non-negative and the product of the non-zero dimensions, and that
// product times the element size, to fit in int64_t (so that no partial
// product a consumer might compute overflows). Returns an empty string on
// success, else what is wrong.
std::string ComputeSizes(const std::vector<int64_t>& shape, int element_size, int64_t* elements,
                         int64_t* bytes) {
  int64_t nonzero_product = 1;
  bool has_zero = false;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) return absl::StrCat("shape[", i, "] is negative: ", shape[i]);
    if (shape[i] == 0) {
      has_zero = true;
      continue;
    }
    if (__builtin_mul_overflow(nonzero_product, shape[i], &nonzero_product)) {
      return absl::StrCat("element count of shape ", ShapeString(shape), " overflows int64");
    }
  }
  int64_t nonzero_bytes;
  if (__builtin_mul_overflow(nonzero_product, int64_t{element_size}, &nonzero_bytes)) {
    return absl::StrCat("byte size of shape ", ShapeString(shape), " with ", element_size,
                        "-byte elements overflows int64");
  }
  *elements = has_zero ? 0 : nonzero_product;
  *bytes = has_zero ? 0 : nonzero_bytes;
  return "";
}

template <typename... Args>
absl::Status Invalid(absl::string_view origin, const Args&... args) {
  return absl::InvalidArgumentError(absl::StrCat(origin, ": ", args...));
}

// Thrown from the JSON parser callback to stop parsing early; never escapes
// this file.
struct HeaderRejected {
  std::string message;
};

// Reads a non-negative JSON integer into `out`. Returns what is wrong, or "".
std::string GetNonNegative(const Json& value, uint64_t* out) {
  if (value.is_number_unsigned()) {
    *out = value.get<uint64_t>();
    return "";
  }
  if (value.is_number_integer()) {
    const auto v = value.get<int64_t>();
    if (v >= 0) {  // "-0"
      *out = static_cast<uint64_t>(v);
      return "";
    }
    return absl::StrCat("is negative: ", v);
  }
  return absl::StrCat("is not an integer: ", Describe(value));
}

struct PendingTensor {
  TensorInfo info;
  uint64_t begin;
  uint64_t end;
};

// Validates one tensor entry of the header. `data_size` is the size of the
// data buffer, which starts at `data`.
absl::Status ParseEntry(absl::string_view origin, const std::string& name, const Json& entry,
                        const uint8_t* data, uint64_t data_size, PendingTensor* out) {
  const std::string where = absl::StrCat("tensor ", Quote(name), ": ");
  if (!entry.is_object()) {
    return Invalid(origin, where, "entry is not a JSON object: ", Describe(entry));
  }

  const auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end()) return Invalid(origin, where, "missing \"dtype\"");
  if (!dtype_it->is_string()) {
    return Invalid(origin, where, "\"dtype\" is not a string: ", Describe(*dtype_it));
  }
  const std::string& dtype = dtype_it->get_ref<const std::string&>();
  absl::StatusOr<ElementType> type = ParseElementType(dtype);
  if (!type.ok()) {
    return Invalid(origin, where, "unsupported dtype ", Quote(dtype),
                   " (supported: ", SupportedTypeNames(), ")");
  }

  const auto shape_it = entry.find("shape");
  if (shape_it == entry.end()) return Invalid(origin, where, "missing \"shape\"");
  if (!shape_it->is_array()) {
    return Invalid(origin, where, "\"shape\" is not an array: ", Describe(*shape_it));
  }
  std::vector<int64_t> shape;
  shape.reserve(shape_it->size());
  for (size_t i = 0; i < shape_it->size(); ++i) {
    const Json& dim = (*shape_it)[i];
    if (dim.is_number_unsigned()) {
      const auto v = dim.get<uint64_t>();
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Invalid(origin, where, "shape[", i, "] exceeds int64: ", v);
      }
      shape.push_back(static_cast<int64_t>(v));
    } else if (dim.is_number_integer()) {
      const auto v = dim.get<int64_t>();
      if (v < 0) return Invalid(origin, where, "shape[", i, "] is negative: ", v);
      shape.push_back(v);
    } else {
      return Invalid(origin, where, "shape[", i, "] is not an integer: ", Describe(dim));
    }
  }
  const int element_size = ElementSize(*type);
  int64_t elements = 0, bytes = 0;
  if (std::string error = ComputeSizes(shape, element_size, &elements, &bytes); !error.empty()) {
    return Invalid(origin, where, error);
  }

  const auto offsets_it = entry.find("data_offsets");
  if (offsets_it == entry.end()) return Invalid(origin, where, "missing \"data_offsets\"");
  if (!offsets_it->is_array() || offsets_it->size() != 2) {
    return Invalid(origin, where,
                   "\"data_offsets\" is not an array of two integers: ", Describe(*offsets_it));
  }
  uint64_t offsets[2];
  for (size_t i = 0; i < 2; ++i) {
    if (std::string error = GetNonNegative((*offsets_it)[i], &offsets[i]); !error.empty()) {
      return Invalid(origin, where, "data_offsets[", i, "] ", error);
    }
  }
  const uint64_t begin = offsets[0], end = offsets[1];
  if (begin > end) {
    return Invalid(origin, where, "data_offsets [", begin, ", ", end, "]: begin exceeds end");
  }
  if (end > data_size) {
    return Invalid(origin, where, "data_offsets [", begin, ", ", end, "]: end exceeds the ",
                   data_size, "-byte data buffer");
  }
  if (end - begin != static_cast<uint64_t>(bytes)) {
    return Invalid(origin, where, "data_offsets [", begin, ", ", end, "] span ", end - begin,
                   " bytes but shape ", ShapeString(shape), " of ", dtype, " needs ", bytes);
  }

  out->info.name = name;
  out->info.type = *type;
  out->info.shape = std::move(shape);
  out->info.data = data + begin;
  out->info.size_bytes = static_cast<size_t>(bytes);
  out->begin = begin;
  out->end = end;
  return absl::OkStatus();
}

absl::Status ParseMetadata(absl::string_view origin, const Json& value,
                           std::map<std::string, std::string>* metadata) {
  if (!value.is_object()) {
    return Invalid(origin, "\"__metadata__\" is not a JSON object: ", Describe(value));
  }
  for (const auto& [key, entry] : value.items()) {
    if (!entry.is_string()) {
      return Invalid(origin, "\"__metadata__\" value of ", Quote(key),
                     " is not a string: ", Describe(entry));
    }
    metadata->emplace(key, entry.get<std::string>());
  }
  return absl::OkStatus();
}

// Writes all of `bytes` to `fd`.
absl::Status WriteAll(int fd, absl::Span<const uint8_t> bytes, const std::string& path) {
  constexpr size_t kMaxChunk = size_t{1} << 30;
  size_t done = 0;
  while (done < bytes.size()) {
    const size_t chunk = std::min(bytes.size() - done, kMaxChunk);
    const ssize_t n = ::write(fd, bytes.data() + done, chunk);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat(path, ": write failed"));
    }
    if (n == 0) return absl::ErrnoToStatus(EIO, absl::StrCat(path, ": write made no progress"));
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Span<const uint8_t> AsBytes(absl::string_view s) {
  return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

}  // namespace

// ---- element types ----------------------------------------------------------

const char* ElementTypeName(ElementType type) {
  const TypeRow* row = FindType(type);
  return row == nullptr ? "INVALID" : row->name;
}

absl::StatusOr<ElementType> ParseElementType(absl::string_view name) {
  for (const TypeRow& row : kTypes) {
    if (name == row.name) return row.type;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown safetensors element type ", Quote(name),
                                                 " (known: ", SupportedTypeNames(), ")"));
}

int ElementSize(ElementType type) {
  const TypeRow* row = FindType(type);
  return row == nullptr ? 0 : row->size;
}

int64_t TensorInfo::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated not to overflow
  return n;
}

// ---- File -------------------------------------------------------------------

File::File(File&& other) noexcept
    : mapping_(std::exchange(other.mapping_, nullptr)),
      mapping_size_(std::exchange(other.mapping_size_, 0)),
      owned_(std::move(other.owned_)),
      tensors_(std::move(other.tensors_)),
      by_name_(std::move(other.by_name_)),
      metadata_(std::move(other.metadata_)) {
  other.Reset();
}

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    Reset();
    mapping_ = std::exchange(other.mapping_, nullptr);
    mapping_size_ = std::exchange(other.mapping_size_, 0);
    owned_ = std::move(other.owned_);
    tensors_ = std::move(other.tensors_);
    by_name_ = std::move(other.by_name_);
    metadata_ = std::move(other.metadata_);
    other.Reset();
  }
  return *this;
}

File::~File() { Reset(); }

void File::Reset() {
  tensors_.clear();
  by_name_.clear();
  metadata_.clear();
  owned_.reset();
  if (mapping_ != nullptr) {
    ::munmap(mapping_, mapping_size_);
    mapping_ = nullptr;
    mapping_size_ = 0;
  }
}

const TensorInfo* File::Find(absl::string_view name) const {
  const auto it = std::lower_bound(by_name_.begin(), by_name_.end(), name,
                                   [this](size_t index, absl::string_view key) {
                                     return absl::string_view(tensors_[index].name) < key;
                                   });
  if (it == by_name_.end() || tensors_[*it].name != name) return nullptr;
  return &tensors_[*it];
}

absl::StatusOr<File> File::Parse(absl::string_view origin, const uint8_t* bytes, size_t size) {
  if (size < kLengthPrefixBytes) {
    return Invalid(origin, "truncated: the file is ", size,
                   " bytes, shorter than the 8-byte header length prefix");
  }
  uint64_t header_size = 0;
  for (size_t i = 0; i < kLengthPrefixBytes; ++i) header_size |= uint64_t{bytes[i]} << (8 * i);
  if (header_size > kMaxHeaderBytes) {
    return Invalid(origin, "header length ", header_size, " exceeds the limit of ", kMaxHeaderBytes,
                   " bytes (not a safetensors file?)");
  }
  const size_t rest = size - kLengthPrefixBytes;
  if (header_size > rest) {
    return Invalid(origin, "truncated: header length ", header_size, " exceeds the ", rest,
                   " bytes after the length prefix");
  }
  const char* header = reinterpret_cast<const char*>(bytes + kLengthPrefixBytes);
  if (header_size == 0) return Invalid(origin, "header is empty");
  if (header[0] != '{') {
    return Invalid(origin, "header does not start with '{' but with ",
                   Quote(absl::string_view(header, 1)));
  }

  // Raw NUL bytes are never valid JSON, but the JSON library takes one as the
  // end of its input and would ignore whatever follows.
  if (const void* nul = std::memchr(header, '\0', header_size); nul != nullptr) {
    return Invalid(origin, "header is not valid JSON: NUL byte at header offset ",
                   static_cast<const char*>(nul) - header);
  }

  // Parse, rejecting duplicate top-level keys (the JSON library would keep
  // only the last one) and deep nesting (to bound the cost of later recursive
  // operations on the document).
  Json root;
  {
    std::set<std::string> keys;
    const Json::parser_callback_t callback = [&keys](int depth, Json::parse_event_t event,
                                                     Json& parsed) {
      switch (event) {
        case Json::parse_event_t::object_start:
        case Json::parse_event_t::array_start:
          if (depth >= kMaxJsonDepth) {
            throw HeaderRejected{
                absl::StrCat("header nests JSON deeper than ", kMaxJsonDepth, " levels")};
          }
          break;
        case Json::parse_event_t::key:
          if (depth == 1 && !keys.insert(parsed.get<std::string>()).second) {
            throw HeaderRejected{
                absl::StrCat("duplicate key ", Quote(parsed.get<std::string>()), " in header")};
          }
          break;
        default:
          break;
      }
      return true;
    };
    try {
      root = Json::parse(header, header + header_size, callback, /*allow_exceptions=*/true,
                         /*ignore_comments=*/false);
    } catch (const Json::exception& e) {
      // parse_error, or out_of_range for a number too large for a double.
      // Drop the "[json.exception.parse_error.101] " prefix.
      absl::string_view what = e.what();
      if (const size_t pos = what.find("] "); pos != absl::string_view::npos) {
        what.remove_prefix(pos + 2);
      }
      return Invalid(origin, "header is not valid JSON: ",
                     Printable(what, /*escape_quotes=*/false, /*max_bytes=*/4 * kMaxQuotedBytes));
    } catch (const HeaderRejected& e) {
      return Invalid(origin, e.message);
    }
  }
  if (!root.is_object()) return Invalid(origin, "header is not a JSON object");

  const uint8_t* data = bytes + kLengthPrefixBytes + header_size;
  const uint64_t data_size = rest - header_size;

  File file;
  std::vector<PendingTensor> pending;
  pending.reserve(root.size());
  for (const auto& [key, value] : root.items()) {
    if (key == kMetadataKey) {
      MEDAKV_RETURN_IF_ERROR(ParseMetadata(origin, value, &file.metadata_));
      continue;
    }
    PendingTensor tensor;
    MEDAKV_RETURN_IF_ERROR(ParseEntry(origin, key, value, data, data_size, &tensor));
    pending.push_back(std::move(tensor));
  }

  // The tensors must tile the data buffer exactly. Sorting by (begin, end)
  // puts a zero-size tensor before a tensor starting at the same offset; ties
  // stay in name order.
  std::stable_sort(pending.begin(), pending.end(),
                   [](const PendingTensor& a, const PendingTensor& b) {
                     return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
                   });
  uint64_t covered = 0;
  for (size_t i = 0; i < pending.size(); ++i) {
    const PendingTensor& t = pending[i];
    if (t.begin < covered) {
      const PendingTensor& prev = pending[i - 1];
      return Invalid(origin, "tensors ", Quote(prev.info.name), " (data_offsets [", prev.begin,
                     ", ", prev.end, "]) and ", Quote(t.info.name), " (data_offsets [", t.begin,
                     ", ", t.end, "]) overlap");
    }
    if (t.begin > covered) {
      return Invalid(
          origin, "hole in the data buffer: bytes [", covered, ", ", t.begin,
          ") are not covered by any tensor (",
          i == 0 ? "before " : absl::StrCat("between ", Quote(pending[i - 1].info.name), " and "),
          Quote(t.info.name), ")");
    }
    covered = t.end;
  }
  if (covered != data_size) {
    return Invalid(origin, "the data buffer has ", data_size - covered,
                   " bytes after the last tensor (the buffer is ", data_size,
                   " bytes, the tensors cover ", covered, ")");
  }

  file.tensors_.reserve(pending.size());
  for (PendingTensor& t : pending) file.tensors_.push_back(std::move(t.info));
  file.by_name_.resize(file.tensors_.size());
  for (size_t i = 0; i < file.by_name_.size(); ++i) file.by_name_[i] = i;
  std::sort(file.by_name_.begin(), file.by_name_.end(),
            [&file](size_t a, size_t b) { return file.tensors_[a].name < file.tensors_[b].name; });
  return file;
}

absl::StatusOr<File> File::FromBytes(std::string bytes) {
  constexpr absl::string_view kOrigin = "<bytes>";
  try {
    auto owned = std::make_unique<std::string>(std::move(bytes));
    const auto* data = reinterpret_cast<const uint8_t*>(owned->data());
    absl::StatusOr<File> file = Parse(kOrigin, data, owned->size());
    if (file.ok()) file->owned_ = std::move(owned);
    return file;
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(kOrigin, ": out of memory"));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(kOrigin, ": unexpected error: ", e.what()));
  }
}

absl::StatusOr<File> File::Open(const std::string& path) {
  int fd;
  do {
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot open"));

  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int error = errno;
    ::close(fd);
    return absl::ErrnoToStatus(error, absl::StrCat(path, ": cannot stat"));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    return absl::ErrnoToStatus(EISDIR, absl::StrCat(path, ": cannot read"));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Invalid(path, "not a regular file");
  }
  const auto size = static_cast<size_t>(st.st_size);
  void* mapping = nullptr;
  if (size > 0) {
    mapping = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (mapping == MAP_FAILED) {
      const int error = errno;
      ::close(fd);
      return absl::ErrnoToStatus(error, absl::StrCat(path, ": cannot mmap ", size, " bytes"));
    }
  }
  ::close(fd);  // the mapping keeps the file open

  absl::StatusOr<File> file;
  try {
    file = Parse(path, static_cast<const uint8_t*>(mapping), size);
  } catch (const std::bad_alloc&) {
    file = absl::ResourceExhaustedError(absl::StrCat(path, ": out of memory"));
  } catch (const std::exception& e) {
    file = absl::InternalError(absl::StrCat(path, ": unexpected error: ", e.what()));
  }
  if (!file.ok()) {
    if (mapping != nullptr) ::munmap(mapping, size);
    return file;
  }
  file->mapping_ = mapping;
  file->mapping_size_ = size;
  return file;
}

// ---- Writer -----------------------------------------------------------------

absl::Status Writer::Add(std::string name, ElementType type, std::vector<int64_t> shape,
                         absl::Span<const uint8_t> data) {
  if (name == kMetadataKey) {
    return absl::InvalidArgumentError("tensor name \"__metadata__\" is reserved for metadata");
  }
  if (!IsValidUtf8(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor name ", Quote(name), " is not valid UTF-8"));
  }
  if (names_.count(name) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("duplicate tensor name ", Quote(name)));
  }
  const int element_size = ElementSize(type);
  if (element_size == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", Quote(name), ": invalid ElementType ", static_cast<int>(type)));
  }
  int64_t elements = 0, bytes = 0;
  if (std::string error = ComputeSizes(shape, element_size, &elements, &bytes); !error.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", Quote(name), ": ", error));
  }
  if (data.size() != static_cast<uint64_t>(bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", Quote(name), ": ", data.size(), " bytes of data but shape ",
                     ShapeString(shape), " of ", ElementTypeName(type), " needs ", bytes));
  }
  names_.insert(name);
  entries_.push_back(Entry{std::move(name), type, std::move(shape), data});
  return absl::OkStatus();
}

void Writer::SetMetadata(std::string key, std::string value) {
  metadata_.insert_or_assign(std::move(key), std::move(value));
}

absl::StatusOr<std::string> Writer::Prefix() const {
  try {
    OrderedJson header = OrderedJson::object();
    if (!metadata_.empty()) {
      OrderedJson metadata = OrderedJson::object();
      for (const auto& [key, value] : metadata_) {
        if (!IsValidUtf8(key)) {
          return absl::InvalidArgumentError(
              absl::StrCat("metadata key ", Quote(key), " is not valid UTF-8"));
        }
        if (!IsValidUtf8(value)) {
          return absl::InvalidArgumentError(
              absl::StrCat("metadata value of ", Quote(key), " is not valid UTF-8"));
        }
        metadata[key] = value;
      }
      header[std::string(kMetadataKey)] = std::move(metadata);
    }
    uint64_t offset = 0;
    for (const Entry& entry : entries_) {
      uint64_t end;
      if (__builtin_add_overflow(offset, uint64_t{entry.data.size()}, &end)) {
        return absl::InvalidArgumentError("total tensor size overflows uint64");
      }
      OrderedJson info = OrderedJson::object();
      info["dtype"] = ElementTypeName(entry.type);
      info["shape"] = entry.shape;
      info["data_offsets"] = OrderedJson::array({offset, end});
      header[entry.name] = std::move(info);
      offset = end;
    }
    std::string text = header.dump();
    // Pad so that the data buffer starts at a multiple of 8 bytes.
    text.append((8 - text.size() % 8) % 8, ' ');
    if (text.size() > kMaxHeaderBytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "header would be ", text.size(), " bytes, over the limit of ", kMaxHeaderBytes));
    }
    std::string prefix(kLengthPrefixBytes, '\0');
    const uint64_t n = text.size();
    for (size_t i = 0; i < kLengthPrefixBytes; ++i) prefix[i] = static_cast<char>(n >> (8 * i));
    prefix += text;
    return prefix;
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory building the safetensors header");
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("unexpected error building the header: ", e.what()));
  }
}

absl::StatusOr<std::string> Writer::Serialize() const {
  MEDAKV_ASSIGN_OR_RETURN(std::string out, Prefix());
  try {
    size_t total = out.size();
    for (const Entry& entry : entries_) total += entry.data.size();
    out.reserve(total);
    for (const Entry& entry : entries_) {
      if (!entry.data.empty()) {
        out.append(reinterpret_cast<const char*>(entry.data.data()), entry.data.size());
      }
    }
  } catch (const std::exception&) {  // bad_alloc or length_error
    return absl::ResourceExhaustedError("out of memory serializing the safetensors file");
  }
  return out;
}

absl::Status Writer::WriteFile(const std::string& path) const {
  MEDAKV_ASSIGN_OR_RETURN(const std::string prefix, Prefix());
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());

  int fd;
  do {
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot create temporary file ", tmp));
  }
  const auto fail = [&](absl::Status status) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    return status;
  };

  if (absl::Status s = WriteAll(fd, AsBytes(prefix), tmp); !s.ok()) return fail(std::move(s));
  for (const Entry& entry : entries_) {
    if (absl::Status s = WriteAll(fd, entry.data, tmp); !s.ok()) return fail(std::move(s));
  }
  if (::fsync(fd) != 0)
    return fail(absl::ErrnoToStatus(errno, absl::StrCat(tmp, ": fsync failed")));
  const int close_result = ::close(fd);
  fd = -1;
  if (close_result != 0) {
    return fail(absl::ErrnoToStatus(errno, absl::StrCat(tmp, ": close failed")));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    return fail(absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot rename ", tmp, " to it")));
  }

  // Make the rename durable too; best effort, the file itself is complete.
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "."
                          : slash == 0               ? "/"
                                                     : path.substr(0, slash);
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
  return absl::OkStatus();
}

}  // namespace medakv::safetensors
