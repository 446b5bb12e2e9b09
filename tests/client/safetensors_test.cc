#include "client/io/safetensors.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace medakv::safetensors {
namespace {

namespace fs = std::filesystem;

constexpr ElementType kAllTypes[] = {
    ElementType::kF16, ElementType::kBF16, ElementType::kF32,  ElementType::kF64, ElementType::kI8,
    ElementType::kU8,  ElementType::kI16,  ElementType::kU16,  ElementType::kI32, ElementType::kU32,
    ElementType::kI64, ElementType::kU64,  ElementType::kBool,
};

// ---- helpers ----------------------------------------------------------------

std::string Le64(uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out;
}

// A file: the length prefix, `header` verbatim, then `data`.
std::string Raw(const std::string& header, const std::string& data = "") {
  return Le64(header.size()) + header + data;
}

// One header entry, `"name": {...}`.
std::string Entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  const std::string& offsets) {
  return absl::StrCat("\"", name, "\": {\"dtype\": \"", dtype, "\", \"shape\": ", shape,
                      ", \"data_offsets\": ", offsets, "}");
}

std::vector<uint8_t> Bytes(std::initializer_list<int> values) {
  std::vector<uint8_t> out;
  for (int v : values) out.push_back(static_cast<uint8_t>(v));
  return out;
}

template <typename T>
absl::Span<const uint8_t> AsBytes(const std::vector<T>& v) {
  return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()),
                                   v.size() * sizeof(T));
}

std::vector<uint8_t> TensorBytes(const TensorInfo& t) {
  return t.size_bytes == 0 ? std::vector<uint8_t>()
                           : std::vector<uint8_t>(t.data, t.data + t.size_bytes);
}

template <typename T>
std::vector<T> Values(const TensorInfo& t) {
  std::vector<T> out(t.size_bytes / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), t.data, t.size_bytes);
  return out;
}

uint64_t HeaderLength(const std::string& file) {
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t{static_cast<uint8_t>(file[i])} << (8 * i);
  return n;
}

// Checks that `status` is InvalidArgument, that its message starts with
// `origin` + ": " and contains `substring`.
void ExpectInvalid(const absl::Status& status, const std::string& substring,
                   const std::string& origin = "<bytes>") {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_TRUE(absl::StartsWith(status.message(), origin + ": ")) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), substring))
      << "message: " << status.message() << "\nexpected to contain: " << substring;
}

void ExpectRejected(const std::string& bytes, const std::string& substring) {
  absl::StatusOr<File> file = File::FromBytes(bytes);
  ASSERT_FALSE(file.ok()) << "accepted a malformed file";
  ExpectInvalid(file.status(), substring);
}

// A fresh directory under the test temp dir, removed at the end of the test.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ =
        fs::path(::testing::TempDir()) / absl::StrCat("safetensors_test_", ::getpid(), "_",
                                                      info->test_suite_name(), "_", info->name());
    fs::remove_all(dir_);
    ASSERT_TRUE(fs::create_directories(dir_));
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }
  std::vector<std::string> DirEntries() const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir_))
      names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }
  void WriteRaw(const std::string& path, const std::string& bytes) const {
    std::ofstream out(path, std::ios::binary);
    out << bytes;
    ASSERT_TRUE(out.good());
  }

  fs::path dir_;
};

// ---- element types ------------------------------------------------------------

TEST(ElementTypeTest, NamesSizesAndParsing) {
  const std::map<ElementType, std::pair<std::string, int>> expected = {
      {ElementType::kF16, {"F16", 2}},   {ElementType::kBF16, {"BF16", 2}},
      {ElementType::kF32, {"F32", 4}},   {ElementType::kF64, {"F64", 8}},
      {ElementType::kI8, {"I8", 1}},     {ElementType::kU8, {"U8", 1}},
      {ElementType::kI16, {"I16", 2}},   {ElementType::kU16, {"U16", 2}},
      {ElementType::kI32, {"I32", 4}},   {ElementType::kU32, {"U32", 4}},
      {ElementType::kI64, {"I64", 8}},   {ElementType::kU64, {"U64", 8}},
      {ElementType::kBool, {"BOOL", 1}},
  };
  ASSERT_EQ(expected.size(), std::size(kAllTypes));
  for (ElementType type : kAllTypes) {
    const auto& [name, size] = expected.at(type);
    EXPECT_EQ(ElementTypeName(type), name);
    EXPECT_EQ(ElementSize(type), size) << name;
    absl::StatusOr<ElementType> parsed = ParseElementType(name);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, type) << name;
  }
  const auto invalid = static_cast<ElementType>(99);
  EXPECT_STREQ(ElementTypeName(invalid), "INVALID");
  EXPECT_EQ(ElementSize(invalid), 0);
}

TEST(ElementTypeTest, ParseRejectsOtherStrings) {
  for (const char* name : {"f16", "F8_E4M3", "", "BOOL ", "FLOAT32"}) {
    absl::StatusOr<ElementType> parsed = ParseElementType(name);
    ASSERT_FALSE(parsed.ok()) << name;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(parsed.status().message(), absl::StrCat("\"", name, "\"")))
        << parsed.status();
  }
}

// ---- roundtrips ----------------------------------------------------------------

TEST(RoundtripTest, EveryElementType) {
  // Shape [2, 3] of each type, with bytes unique to the type and position.
  std::vector<std::vector<uint8_t>> buffers;
  buffers.reserve(std::size(kAllTypes));
  Writer writer;
  for (size_t t = 0; t < std::size(kAllTypes); ++t) {
    const ElementType type = kAllTypes[t];
    std::vector<uint8_t> bytes(6 * ElementSize(type));
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(t * 19 + i * 7 + 1);
    if (type == ElementType::kBool) bytes = Bytes({1, 0, 0, 1, 1, 0});
    buffers.push_back(std::move(bytes));
    ASSERT_TRUE(
        writer.Add(absl::StrCat("t_", ElementTypeName(type)), type, {2, 3}, buffers.back()).ok());
  }
  absl::StatusOr<std::string> bytes = writer.Serialize();
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  absl::StatusOr<File> file = File::FromBytes(*bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(file->tensors().size(), std::size(kAllTypes));
  for (size_t t = 0; t < std::size(kAllTypes); ++t) {
    const ElementType type = kAllTypes[t];
    const std::string name = absl::StrCat("t_", ElementTypeName(type));
    const TensorInfo* info = file->Find(name);
    ASSERT_NE(info, nullptr) << name;
    EXPECT_EQ(info->name, name);
    EXPECT_EQ(info->type, type) << name;
    EXPECT_EQ(info->shape, (std::vector<int64_t>{2, 3})) << name;
    EXPECT_EQ(info->NumElements(), 6) << name;
    EXPECT_EQ(info->size_bytes, size_t{6} * ElementSize(type)) << name;
    EXPECT_EQ(TensorBytes(*info), buffers[t]) << name;
    // Added in order, so the data buffer is in the same order.
    EXPECT_EQ(file->tensors()[t].name, name);
  }
}

TEST(RoundtripTest, TypedValuesSurvive) {
  const std::vector<double> f64 = {3.141592653589793, -0.0, 1e300};
  const std::vector<int64_t> i64 = {INT64_MIN, -1, INT64_MAX};
  const std::vector<uint16_t> bf16 = {0x3F80, 0xC000, 0x7F80};  // 1, -2, +inf
  Writer writer;
  ASSERT_TRUE(writer.Add("f64", ElementType::kF64, {3}, AsBytes(f64)).ok());
  ASSERT_TRUE(writer.Add("i64", ElementType::kI64, {3, 1}, AsBytes(i64)).ok());
  ASSERT_TRUE(writer.Add("bf16", ElementType::kBF16, {1, 3}, AsBytes(bf16)).ok());
  absl::StatusOr<File> file = File::FromBytes(*writer.Serialize());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(Values<double>(*file->Find("f64")), f64);
  EXPECT_EQ(Values<int64_t>(*file->Find("i64")), i64);
  EXPECT_EQ(Values<uint16_t>(*file->Find("bf16")), bf16);
  EXPECT_EQ(file->Find("i64")->shape, (std::vector<int64_t>{3, 1}));
}

TEST(RoundtripTest, ScalarShape) {
  const std::vector<double> value = {-2.75};
  Writer writer;
  ASSERT_TRUE(writer.Add("scalar", ElementType::kF64, {}, AsBytes(value)).ok());
  absl::StatusOr<std::string> bytes = writer.Serialize();
  ASSERT_TRUE(bytes.ok());
  EXPECT_TRUE(absl::StrContains(*bytes, "\"shape\":[]"));
  absl::StatusOr<File> file = File::FromBytes(*bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  const TensorInfo* t = file->Find("scalar");
  ASSERT_NE(t, nullptr);
  EXPECT_TRUE(t->shape.empty());
  EXPECT_EQ(t->NumElements(), 1);
  EXPECT_EQ(t->size_bytes, 8u);
  EXPECT_EQ(Values<double>(*t), value);
}

TEST(RoundtripTest, ZeroSizeTensors) {
  const std::vector<uint8_t> before = Bytes({1, 2, 3});
  const std::vector<uint8_t> after = Bytes({9, 8});
  Writer writer;
  ASSERT_TRUE(writer.Add("before", ElementType::kU8, {3}, before).ok());
  ASSERT_TRUE(writer.Add("empty1d", ElementType::kF32, {0}, {}).ok());
  ASSERT_TRUE(writer.Add("empty3d", ElementType::kI64, {3, 0, 2}, {}).ok());
  ASSERT_TRUE(writer.Add("after", ElementType::kU8, {2}, after).ok());
  absl::StatusOr<std::string> bytes = writer.Serialize();
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ(bytes->size(), 8 + HeaderLength(*bytes) + 5);
  absl::StatusOr<File> file = File::FromBytes(*bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(file->tensors().size(), 4u);
  const TensorInfo* e1 = file->Find("empty1d");
  const TensorInfo* e3 = file->Find("empty3d");
  ASSERT_NE(e1, nullptr);
  ASSERT_NE(e3, nullptr);
  EXPECT_EQ(e1->shape, (std::vector<int64_t>{0}));
  EXPECT_EQ(e3->shape, (std::vector<int64_t>{3, 0, 2}));
  EXPECT_EQ(e1->NumElements(), 0);
  EXPECT_EQ(e3->NumElements(), 0);
  EXPECT_EQ(e1->size_bytes, 0u);
  EXPECT_EQ(e3->size_bytes, 0u);
  EXPECT_EQ(TensorBytes(*file->Find("before")), before);
  EXPECT_EQ(TensorBytes(*file->Find("after")), after);
  std::vector<std::string> order;
  for (const TensorInfo& t : file->tensors()) order.push_back(t.name);
  EXPECT_EQ(order, (std::vector<std::string>{"before", "empty1d", "empty3d", "after"}));
}

TEST(RoundtripTest, OnlyZeroSizeTensorsAndNoTensors) {
  Writer empty_writer;
  absl::StatusOr<std::string> empty_bytes = empty_writer.Serialize();
  ASSERT_TRUE(empty_bytes.ok());
  absl::StatusOr<File> empty = File::FromBytes(*empty_bytes);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->tensors().empty());
  EXPECT_TRUE(empty->metadata().empty());
  EXPECT_EQ(empty->Find(""), nullptr);

  Writer writer;
  ASSERT_TRUE(writer.Add("z", ElementType::kBF16, {0, 5}, {}).ok());
  absl::StatusOr<File> file = File::FromBytes(*writer.Serialize());
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(file->tensors().size(), 1u);
  EXPECT_EQ(file->tensors()[0].size_bytes, 0u);
}

TEST(RoundtripTest, ManyTensors) {
  constexpr int kCount = 1000;
  std::vector<std::vector<int32_t>> values(kCount);
  Writer writer;
  for (int i = 0; i < kCount; ++i) {
    values[i].resize(i % 5);
    for (size_t j = 0; j < values[i].size(); ++j) values[i][j] = i * 1000 + static_cast<int>(j);
    ASSERT_TRUE(writer
                    .Add(absl::StrCat("layer.", i, ".w"), ElementType::kI32,
                         {static_cast<int64_t>(values[i].size())}, AsBytes(values[i]))
                    .ok());
  }
  absl::StatusOr<File> file = File::FromBytes(*writer.Serialize());
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(file->tensors().size(), static_cast<size_t>(kCount));
  for (int i = 0; i < kCount; ++i) {
    const std::string name = absl::StrCat("layer.", i, ".w");
    const TensorInfo* t = file->Find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(Values<int32_t>(*t), values[i]) << name;
    // Data-offset order is the order of Add (ties between empty tensors
    // aside, which are all empty anyway).
    if (!values[i].empty()) {
      EXPECT_EQ(file->tensors()[i].name, name);
    }
  }
  EXPECT_EQ(file->Find("layer.1000.w"), nullptr);
  EXPECT_EQ(file->Find("layer.1"), nullptr);
  EXPECT_EQ(file->Find(""), nullptr);
}

TEST(RoundtripTest, Metadata) {
  const std::vector<uint8_t> data = Bytes({5});
  Writer writer;
  ASSERT_TRUE(writer.Add("x", ElementType::kU8, {1}, data).ok());
  writer.SetMetadata("format", "pt");
  writer.SetMetadata("note", "replaced");
  writer.SetMetadata("note", "h\xC3\xA9llo \"quoted\"\n\\");  // UTF-8, escapes
  writer.SetMetadata("", "empty key");
  absl::StatusOr<std::string> bytes = writer.Serialize();
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  absl::StatusOr<File> file = File::FromBytes(*bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  const std::map<std::string, std::string> expected = {
      {"format", "pt"}, {"note", "h\xC3\xA9llo \"quoted\"\n\\"}, {"", "empty key"}};
  EXPECT_EQ(file->metadata(), expected);
  EXPECT_EQ(file->Find("__metadata__"), nullptr);
  ASSERT_EQ(file->tensors().size(), 1u);
}

TEST(RoundtripTest, NoMetadataMeansNoMetadataKey) {
  const std::vector<uint8_t> data = Bytes({5});
  Writer writer;
  ASSERT_TRUE(writer.Add("x", ElementType::kU8, {1}, data).ok());
  absl::StatusOr<std::string> bytes = writer.Serialize();
  ASSERT_TRUE(bytes.ok());
  EXPECT_FALSE(absl::StrContains(*bytes, "__metadata__"));
  absl::StatusOr<File> file = File::FromBytes(*bytes);
  ASSERT_TRUE(file.ok());
  EXPECT_TRUE(file->metadata().empty());
}

TEST(RoundtripTest, UnicodeAndOddNames) {
  const std::vector<uint8_t> a = Bytes({1}), b = Bytes({2}), c = Bytes({3});
  const std::string unicode = "\xE6\x9D\x83\xE9\x87\x8D.w";  // 权重.w
  Writer writer;
  ASSERT_TRUE(writer.Add(unicode, ElementType::kU8, {1}, a).ok());
  ASSERT_TRUE(writer.Add("", ElementType::kU8, {1}, b).ok());
  ASSERT_TRUE(writer.Add(std::string("nul\0in\"name\\", 12), ElementType::kU8, {1}, c).ok());
  absl::StatusOr<File> file = File::FromBytes(*writer.Serialize());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(TensorBytes(*file->Find(unicode)), a);
  EXPECT_EQ(TensorBytes(*file->Find("")), b);
  EXPECT_EQ(TensorBytes(*file->Find(std::string("nul\0in\"name\\", 12))), c);
}

// ---- the serialized form ------------------------------------------------------------

TEST(SerializeTest, HeaderIsPaddedTo8BytesAndDataIsExact) {
  // Names of every length mod 8 exercise every amount of padding.
  for (int extra = 0; extra < 8; ++extra) {
    const std::vector<uint8_t> a = Bytes({0xAA, 0xBB, 0xCC});
    const std::vector<uint16_t> b = {0x1234, 0xFEDC};
    Writer writer;
    ASSERT_TRUE(writer.Add("zeta" + std::string(extra, 'x'), ElementType::kU8, {3}, a).ok());
    ASSERT_TRUE(writer.Add("alpha", ElementType::kI16, {2}, AsBytes(b)).ok());
    absl::StatusOr<std::string> bytes = writer.Serialize();
    ASSERT_TRUE(bytes.ok()) << bytes.status();

    const uint64_t n = HeaderLength(*bytes);
    EXPECT_EQ((8 + n) % 8, 0u) << "extra " << extra;
    ASSERT_EQ(bytes->size(), 8 + n + 7);
    const std::string header = bytes->substr(8, n);
    const size_t json_end = header.find_last_not_of(' ') + 1;
    EXPECT_EQ(header[json_end - 1], '}');
    EXPECT_LT(n - json_end, 8u) << "padding is shorter than 8 bytes";

    // The header, as any JSON reader sees it; insertion order is kept.
    const nlohmann::ordered_json parsed = nlohmann::ordered_json::parse(header);
    ASSERT_EQ(parsed.size(), 2u);
    EXPECT_EQ(parsed.begin().key(), "zeta" + std::string(extra, 'x'));
    const auto& za = parsed.at("zeta" + std::string(extra, 'x'));
    EXPECT_EQ(za.at("dtype"), "U8");
    EXPECT_EQ(za.at("shape"), nlohmann::ordered_json::array({3}));
    EXPECT_EQ(za.at("data_offsets"), nlohmann::ordered_json::array({0, 3}));
    const auto& al = parsed.at("alpha");
    EXPECT_EQ(al.at("dtype"), "I16");
    EXPECT_EQ(al.at("shape"), nlohmann::ordered_json::array({2}));
    EXPECT_EQ(al.at("data_offsets"), nlohmann::ordered_json::array({3, 7}));

    // The data buffer is the added bytes, in the order added, and nothing else.
    const std::string data = bytes->substr(8 + n);
    EXPECT_EQ(data, std::string("\xAA\xBB\xCC\x34\x12\xDC\xFE", 7));
  }
}

TEST(SerializeTest, MetadataComesFirst) {
  const std::vector<uint8_t> a = Bytes({1});
  Writer writer;
  ASSERT_TRUE(writer.Add("a", ElementType::kU8, {1}, a).ok());
  writer.SetMetadata("k", "v");
  absl::StatusOr<std::string> bytes = writer.Serialize();
  ASSERT_TRUE(bytes.ok());
  const auto parsed = nlohmann::ordered_json::parse(bytes->substr(8, HeaderLength(*bytes)));
  EXPECT_EQ(parsed.begin().key(), "__metadata__");
  EXPECT_EQ(parsed.at("__metadata__"), (nlohmann::ordered_json{{"k", "v"}}));
}

TEST(SerializeTest, SerializeIsRepeatableAndSeesCurrentData) {
  std::vector<uint8_t> a = Bytes({1, 2});
  Writer writer;
  ASSERT_TRUE(writer.Add("a", ElementType::kU8, {2}, a).ok());
  absl::StatusOr<std::string> first = writer.Serialize();
  absl::StatusOr<std::string> second = writer.Serialize();
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(*first, *second);
  a[1] = 7;  // not copied by Add
  absl::StatusOr<std::string> third = writer.Serialize();
  ASSERT_TRUE(third.ok());
  EXPECT_EQ(third->back(), '\x07');
}

// ---- Writer::Add validation ---------------------------------------------------------

TEST(WriterTest, RejectsDuplicateName) {
  const std::vector<uint8_t> a = Bytes({1}), b = Bytes({2});
  Writer writer;
  ASSERT_TRUE(writer.Add("w", ElementType::kU8, {1}, a).ok());
  const absl::Status status = writer.Add("w", ElementType::kU8, {1}, b);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(), "duplicate tensor name \"w\"")) << status;
  // The first one is kept.
  absl::StatusOr<File> file = File::FromBytes(*writer.Serialize());
  ASSERT_TRUE(file.ok());
  ASSERT_EQ(file->tensors().size(), 1u);
  EXPECT_EQ(TensorBytes(file->tensors()[0]), a);
}

TEST(WriterTest, RejectsMetadataName) {
  const std::vector<uint8_t> a = Bytes({1});
  Writer writer;
  const absl::Status status = writer.Add("__metadata__", ElementType::kU8, {1}, a);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(), "\"__metadata__\" is reserved")) << status;
}

TEST(WriterTest, RejectsSizeMismatch) {
  const std::vector<uint8_t> data(11);
  Writer writer;
  const absl::Status status = writer.Add("w", ElementType::kF32, {3}, data);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(), "11 bytes of data but shape [3] of F32 needs 12"))
      << status;
  EXPECT_FALSE(writer.Add("w", ElementType::kF32, {0}, data).ok());
  EXPECT_FALSE(writer.Add("w", ElementType::kF32, {}, {}).ok());  // a scalar has one element
  // Rejected tensors leave nothing behind.
  absl::StatusOr<File> file = File::FromBytes(*writer.Serialize());
  ASSERT_TRUE(file.ok());
  EXPECT_TRUE(file->tensors().empty());
}

TEST(WriterTest, RejectsNegativeDimension) {
  Writer writer;
  const absl::Status status = writer.Add("w", ElementType::kU8, {2, -1}, {});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(), "shape[1] is negative: -1")) << status;
}

TEST(WriterTest, RejectsOverflowingShapes) {
  Writer writer;
  absl::Status status = writer.Add("w", ElementType::kU8, {int64_t{1} << 32, int64_t{1} << 32}, {});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(),
                                "element count of shape [4294967296, 4294967296] overflows int64"))
      << status;
  status = writer.Add("w", ElementType::kF64, {int64_t{1} << 61}, {});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(), "byte size of shape [2305843009213693952]"))
      << status;
}

TEST(WriterTest, RejectsInvalidUtf8NameAndType) {
  const std::vector<uint8_t> a = Bytes({1});
  Writer writer;
  absl::Status status = writer.Add("bad\xFF", ElementType::kU8, {1}, a);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(), "not valid UTF-8")) << status;
  status = writer.Add("w", static_cast<ElementType>(42), {1}, a);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(status.message(), "invalid ElementType 42")) << status;
}

TEST(WriterTest, InvalidUtf8MetadataFailsSerialize) {
  Writer writer;
  writer.SetMetadata("key", "\xC0\x80");  // overlong NUL
  absl::StatusOr<std::string> bytes = writer.Serialize();
  ASSERT_FALSE(bytes.ok());
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(
      absl::StrContains(bytes.status().message(), "metadata value of \"key\" is not valid UTF-8"))
      << bytes.status();
}

// ---- files on disk --------------------------------------------------------------

using FileIoTest = TempDirTest;

TEST_F(FileIoTest, WriteFileThenOpen) {
  const std::vector<float> weights = {1.0f, -2.5f, 1e-3f, 65504.0f};
  const std::vector<uint8_t> flags = Bytes({1, 0, 1});
  Writer writer;
  ASSERT_TRUE(writer.Add("weights", ElementType::kF32, {2, 2}, AsBytes(weights)).ok());
  ASSERT_TRUE(writer.Add("flags", ElementType::kBool, {3}, flags).ok());
  writer.SetMetadata("format", "pt");
  const std::string path = Path("model.safetensors");
  const absl::Status written = writer.WriteFile(path);
  ASSERT_TRUE(written.ok()) << written;
  EXPECT_EQ(DirEntries(), (std::vector<std::string>{"model.safetensors"}))
      << "temporary file left behind";

  absl::StatusOr<std::string> expected_bytes = writer.Serialize();
  ASSERT_TRUE(expected_bytes.ok());
  std::ifstream in(path, std::ios::binary);
  const std::string on_disk((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(on_disk, *expected_bytes);

  absl::StatusOr<File> file = File::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(file->tensors().size(), 2u);
  EXPECT_EQ(file->tensors()[0].name, "weights");
  EXPECT_EQ(Values<float>(*file->Find("weights")), weights);
  EXPECT_EQ(file->Find("weights")->shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(TensorBytes(*file->Find("flags")), flags);
  EXPECT_EQ(file->Find("flags")->type, ElementType::kBool);
  EXPECT_EQ(file->metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
}

TEST_F(FileIoTest, WriteFileReplacesExistingFile) {
  const std::string path = Path("model.safetensors");
  WriteRaw(path, "old contents, much longer than the new file will be ......................");
  const std::vector<uint8_t> a = Bytes({42});
  Writer writer;
  ASSERT_TRUE(writer.Add("a", ElementType::kU8, {1}, a).ok());
  ASSERT_TRUE(writer.WriteFile(path).ok());
  absl::StatusOr<File> file = File::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(TensorBytes(*file->Find("a")), a);
  EXPECT_EQ(DirEntries(), (std::vector<std::string>{"model.safetensors"}));
}

TEST_F(FileIoTest, WriteFileIntoMissingDirectoryFailsCleanly) {
  const std::string path = Path("no_such_dir/model.safetensors");
  Writer writer;
  const absl::Status status = writer.WriteFile(path);
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), path)) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), std::strerror(ENOENT))) << status;
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(Path("no_such_dir")));
  EXPECT_TRUE(DirEntries().empty());
}

TEST_F(FileIoTest, FailedRenameRemovesTemporaryFile) {
  // The target is a non-empty directory: rename(2) fails after the data was
  // written, and the temporary file must go.
  const std::string path = Path("model.safetensors");
  ASSERT_TRUE(fs::create_directories(path + "/child"));
  const std::vector<uint8_t> a = Bytes({1});
  Writer writer;
  ASSERT_TRUE(writer.Add("a", ElementType::kU8, {1}, a).ok());
  const absl::Status status = writer.WriteFile(path);
  EXPECT_FALSE(status.ok());
  EXPECT_TRUE(absl::StrContains(status.message(), path)) << status;
  EXPECT_TRUE(absl::StrContains(status.message(), "cannot rename")) << status;
  EXPECT_EQ(DirEntries(), (std::vector<std::string>{"model.safetensors"}));
  EXPECT_TRUE(fs::is_directory(path));
}

TEST_F(FileIoTest, OpenMissingFile) {
  const std::string path = Path("absent.safetensors");
  absl::StatusOr<File> file = File::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StartsWith(file.status().message(), path + ": ")) << file.status();
  EXPECT_TRUE(absl::StrContains(file.status().message(), std::strerror(ENOENT))) << file.status();
}

TEST_F(FileIoTest, OpenDirectory) {
  absl::StatusOr<File> file = File::Open(dir_.string());
  ASSERT_FALSE(file.ok());
  EXPECT_TRUE(absl::StartsWith(file.status().message(), dir_.string() + ": ")) << file.status();
  EXPECT_TRUE(absl::StrContains(file.status().message(), std::strerror(EISDIR))) << file.status();
}

TEST_F(FileIoTest, OpenUnreadableFile) {
  if (::geteuid() == 0) GTEST_SKIP() << "root can read files without read permission";
  const std::string path = Path("secret.safetensors");
  WriteRaw(path, Raw("{}"));
  ASSERT_EQ(::chmod(path.c_str(), 0), 0);
  absl::StatusOr<File> file = File::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_TRUE(absl::StrContains(file.status().message(), std::strerror(EACCES))) << file.status();
}

TEST_F(FileIoTest, OpenFifoDoesNotHang) {
  const std::string path = Path("fifo");
  ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
  absl::StatusOr<File> file = File::Open(path);
  ASSERT_FALSE(file.ok());
  ExpectInvalid(file.status(), "not a regular file", path);
}

TEST_F(FileIoTest, MalformedFileMessageStartsWithPath) {
  const std::string path = Path("model.safetensors");
  WriteRaw(path, Le64(4096) + std::string(120, '{'));
  absl::StatusOr<File> file = File::Open(path);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().message(),
            path + ": truncated: header length 4096 exceeds the 120 bytes after the length prefix");
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(FileIoTest, OpenEmptyFile) {
  const std::string path = Path("empty.safetensors");
  WriteRaw(path, "");
  absl::StatusOr<File> file = File::Open(path);
  ASSERT_FALSE(file.ok());
  ExpectInvalid(file.status(), "truncated: the file is 0 bytes", path);
}

// ---- File ------------------------------------------------------------------------

TEST(FileTest, MoveKeepsTensorsValid) {
  // Small enough that std::string would keep it inline (SSO): the File must
  // not point into a moved string.
  absl::StatusOr<File> tiny = File::FromBytes(Raw("{}"));
  ASSERT_TRUE(tiny.ok()) << tiny.status();

  const std::vector<uint8_t> data = Bytes({7, 6, 5, 4});
  Writer writer;
  ASSERT_TRUE(writer.Add("w", ElementType::kU16, {2}, data).ok());
  absl::StatusOr<File> file = File::FromBytes(*writer.Serialize());
  ASSERT_TRUE(file.ok());
  const uint8_t* before = file->Find("w")->data;

  File moved(*std::move(file));
  ASSERT_NE(moved.Find("w"), nullptr);
  EXPECT_EQ(moved.Find("w")->data, before);
  EXPECT_EQ(TensorBytes(*moved.Find("w")), data);

  File assigned = *std::move(tiny);
  assigned = std::move(moved);
  EXPECT_EQ(TensorBytes(*assigned.Find("w")), data);
  EXPECT_TRUE(moved.tensors().empty());  // NOLINT(bugprone-use-after-move): documented as empty
  EXPECT_EQ(moved.Find("w"), nullptr);   // NOLINT(bugprone-use-after-move)
}

TEST(FileTest, AcceptsUnknownFieldsAndPaddingAndMinusZero) {
  const std::string header = absl::StrCat(
      "{\"a\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [-0, 2], \"extra\": {\"x\": "
      "[1]}}}",
      "   \t\n");
  absl::StatusOr<File> file = File::FromBytes(Raw(header, "\x01\x02"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(TensorBytes(*file->Find("a")), Bytes({1, 2}));
}

TEST(FileTest, ZeroSizeTensorsMayShareAnOffset) {
  const std::string header = absl::StrCat(
      "{", Entry("big", "U8", "[2]", "[0, 2]"), ", ", Entry("e1", "F32", "[0]", "[2, 2]"), ", ",
      Entry("e0", "F32", "[0]", "[0, 0]"), ", ", Entry("e2", "F32", "[0, 4]", "[2, 2]"), "}");
  absl::StatusOr<File> file = File::FromBytes(Raw(header, "ab"));
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<std::string> order;
  for (const TensorInfo& t : file->tensors()) order.push_back(t.name);
  EXPECT_EQ(order, (std::vector<std::string>{"e0", "big", "e1", "e2"}));
}

TEST(FileTest, DataPointersAreInsideTheBuffer) {
  const std::string header = absl::StrCat("{", Entry("b", "U8", "[3]", "[1, 4]"), ", ",
                                          Entry("a", "U8", "[1]", "[0, 1]"), "}");
  absl::StatusOr<File> file = File::FromBytes(Raw(header, "wxyz"));
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(file->tensors().size(), 2u);
  EXPECT_EQ(file->tensors()[0].name, "a");
  EXPECT_EQ(file->tensors()[1].data, file->tensors()[0].data + 1);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(file->Find("b")->data), 3), "xyz");
}

// ---- malformed input: one test per rule ---------------------------------------------

TEST(MalformedTest, ShorterThanLengthPrefix) {
  ExpectRejected("",
                 "truncated: the file is 0 bytes, shorter than the 8-byte header length prefix");
  ExpectRejected(std::string("\x02\0\0\0\0\0\0", 7), "truncated: the file is 7 bytes");
}

TEST(MalformedTest, HeaderLengthBeyondFile) {
  ExpectRejected(Le64(4096) + std::string(120, ' '),
                 "truncated: header length 4096 exceeds the 120 bytes after the length prefix");
  ExpectRejected(Le64(3) + "{}", "truncated: header length 3 exceeds the 2 bytes");
}

TEST(MalformedTest, HeaderLengthOverLimit) {
  ExpectRejected(Le64((uint64_t{100} << 20) + 1) + "{}",
                 "header length 104857601 exceeds the limit of 104857600 bytes");
  ExpectRejected(Le64(UINT64_MAX) + "{}", "header length 18446744073709551615 exceeds the limit");
}

TEST(MalformedTest, EmptyHeader) { ExpectRejected(Raw(""), "header is empty"); }

TEST(MalformedTest, HeaderNotJson) {
  ExpectRejected(Raw("{\"a\": "), "header is not valid JSON: ");
  ExpectRejected(Raw("{} trailing"), "header is not valid JSON: ");
  ExpectRejected(Raw("{'a': 1}"), "header is not valid JSON: ");
  ExpectRejected(Raw("{\"a\": {\"x\": 1e999}}"),
                 "header is not valid JSON: number overflow parsing '1e999'");
  // The JSON library would stop at a NUL byte and ignore the rest.
  ExpectRejected(Raw(std::string("{}\0   ", 6)),
                 "header is not valid JSON: NUL byte at header offset 2");
  ExpectRejected(Raw(std::string("{\"a\": \"\0\"}", 10)), "NUL byte at header offset 7");
}

TEST(MalformedTest, HeaderNotUtf8) {
  ExpectRejected(Raw("{\"\xFF\": 1}"), "header is not valid JSON: ");
  ExpectRejected(Raw("{\"\xFF\": 1}"), "UTF-8");
}

TEST(MalformedTest, HeaderNotAnObject) {
  ExpectRejected(Raw("[1, 2]"), "header does not start with '{' but with \"[\"");
  ExpectRejected(Raw("\"str\""), "header does not start with '{'");
  ExpectRejected(Raw(" {}"), "header does not start with '{' but with \" \"");
}

TEST(MalformedTest, DuplicateTensorName) {
  const std::string header = absl::StrCat("{", Entry("w", "U8", "[1]", "[0, 1]"), ", ",
                                          Entry("w", "U8", "[1]", "[1, 2]"), "}");
  ExpectRejected(Raw(header, "ab"), "duplicate key \"w\" in header");
}

TEST(MalformedTest, NestingTooDeep) {
  const std::string header =
      "{\"a\": {\"extra\": " + std::string(100, '[') + std::string(100, ']') + "}}";
  ExpectRejected(Raw(header), "header nests JSON deeper than 32 levels");
  // Deep enough to overflow a recursive parser's stack, and still rejected.
  const std::string huge = "{\"a\": " + std::string(1000000, '[');
  ExpectRejected(Raw(huge), "deeper than 32");
}

TEST(MalformedTest, EntryNotAnObject) {
  ExpectRejected(Raw("{\"w\": 5}"), "tensor \"w\": entry is not a JSON object: 5");
  ExpectRejected(Raw("{\"w\": [\"F32\", [1], [0, 4]]}"),
                 "tensor \"w\": entry is not a JSON object");
}

TEST(MalformedTest, MissingDtype) {
  ExpectRejected(Raw("{\"w\": {\"shape\": [1], \"data_offsets\": [0, 1]}}", "x"),
                 "tensor \"w\": missing \"dtype\"");
}

TEST(MalformedTest, DtypeNotAString) {
  ExpectRejected(Raw("{\"w\": {\"dtype\": 4, \"shape\": [1], \"data_offsets\": [0, 1]}}", "x"),
                 "tensor \"w\": \"dtype\" is not a string: 4");
}

TEST(MalformedTest, UnknownDtype) {
  ExpectRejected(Raw("{" + Entry("w", "F8_E4M3", "[1]", "[0, 1]") + "}", "x"),
                 "tensor \"w\": unsupported dtype \"F8_E4M3\" (supported: F16, BF16,");
  ExpectRejected(Raw("{" + Entry("w", "f32", "[1]", "[0, 4]") + "}", "xxxx"),
                 "unsupported dtype \"f32\"");
}

TEST(MalformedTest, MissingShape) {
  ExpectRejected(Raw("{\"w\": {\"dtype\": \"U8\", \"data_offsets\": [0, 1]}}", "x"),
                 "tensor \"w\": missing \"shape\"");
}

TEST(MalformedTest, ShapeNotAnArray) {
  ExpectRejected(Raw("{" + Entry("w", "U8", "1", "[0, 1]") + "}", "x"),
                 "tensor \"w\": \"shape\" is not an array: 1");
  ExpectRejected(Raw("{" + Entry("w", "U8", "null", "[0, 1]") + "}", "x"),
                 "\"shape\" is not an array: null");
}

TEST(MalformedTest, ShapeElementNotAnInteger) {
  ExpectRejected(Raw("{" + Entry("w", "U8", "[1.0]", "[0, 1]") + "}", "x"),
                 "tensor \"w\": shape[0] is not an integer: 1.0");
  ExpectRejected(Raw("{" + Entry("w", "U8", "[1, \"2\"]", "[0, 2]") + "}", "xx"),
                 "shape[1] is not an integer: \"2\"");
  ExpectRejected(Raw("{" + Entry("w", "U8", "[true]", "[0, 1]") + "}", "x"),
                 "shape[0] is not an integer: true");
}

TEST(MalformedTest, NegativeDimension) {
  ExpectRejected(Raw("{" + Entry("w", "U8", "[2, -3]", "[0, 0]") + "}"),
                 "tensor \"w\": shape[1] is negative: -3");
}

TEST(MalformedTest, DimensionBeyondInt64) {
  ExpectRejected(Raw("{" + Entry("w", "U8", "[9223372036854775808]", "[0, 0]") + "}"),
                 "shape[0] exceeds int64: 9223372036854775808");
}

TEST(MalformedTest, ElementCountOverflow) {
  ExpectRejected(Raw("{" + Entry("w", "U8", "[4294967296, 4294967296]", "[0, 0]") + "}"),
                 "tensor \"w\": element count of shape [4294967296, 4294967296] overflows int64");
  // Also when another dimension is 0.
  ExpectRejected(Raw("{" + Entry("w", "U8", "[4294967296, 0, 4294967296]", "[0, 0]") + "}"),
                 "element count of shape [4294967296, 0, 4294967296] overflows int64");
}

TEST(MalformedTest, ByteSizeOverflow) {
  ExpectRejected(Raw("{" + Entry("w", "F64", "[2305843009213693952]", "[0, 0]") + "}"),
                 "tensor \"w\": byte size of shape [2305843009213693952] with 8-byte elements "
                 "overflows int64");
}

TEST(MalformedTest, MissingDataOffsets) {
  ExpectRejected(Raw("{\"w\": {\"dtype\": \"U8\", \"shape\": [1]}}", "x"),
                 "tensor \"w\": missing \"data_offsets\"");
}

TEST(MalformedTest, DataOffsetsNotTwoIntegers) {
  ExpectRejected(Raw("{" + Entry("w", "U8", "[1]", "[0]") + "}", "x"),
                 "tensor \"w\": \"data_offsets\" is not an array of two integers: [0]");
  ExpectRejected(Raw("{" + Entry("w", "U8", "[1]", "[0, 1, 2]") + "}", "x"),
                 "\"data_offsets\" is not an array of two integers: [0,1,2]");
  ExpectRejected(Raw("{" + Entry("w", "U8", "[1]", "\"0,1\"") + "}", "x"),
                 "\"data_offsets\" is not an array of two integers: \"0,1\"");
  ExpectRejected(Raw("{" + Entry("w", "U8", "[1]", "[0, 1.0]") + "}", "x"),
                 "data_offsets[1] is not an integer: 1.0");
  ExpectRejected(Raw("{" + Entry("w", "U8", "[1]", "[0, 18446744073709551616]") + "}", "x"),
                 "data_offsets[1] is not an integer");
}

TEST(MalformedTest, DataOffsetNegative) {
  ExpectRejected(Raw("{" + Entry("w", "U8", "[1]", "[-1, 0]") + "}", "x"),
                 "tensor \"w\": data_offsets[0] is negative: -1");
}

TEST(MalformedTest, DataOffsetsBeginAfterEnd) {
  ExpectRejected(Raw("{" + Entry("w", "U8", "[0]", "[3, 1]") + "}", "xxx"),
                 "tensor \"w\": data_offsets [3, 1]: begin exceeds end");
}

TEST(MalformedTest, DataOffsetsBeyondBuffer) {
  ExpectRejected(Raw("{" + Entry("w", "U8", "[4]", "[0, 4]") + "}", "xxx"),
                 "tensor \"w\": data_offsets [0, 4]: end exceeds the 3-byte data buffer");
  ExpectRejected(
      Raw("{" + Entry("w", "U8", "[0]", "[18446744073709551615, 18446744073709551615]") + "}"),
      "end exceeds the 0-byte data buffer");
}

TEST(MalformedTest, ByteSizeMismatch) {
  ExpectRejected(Raw("{" + Entry("w", "F32", "[2]", "[0, 4]") + "}", "xxxx"),
                 "tensor \"w\": data_offsets [0, 4] span 4 bytes but shape [2] of F32 needs 8");
}

TEST(MalformedTest, OverlappingTensors) {
  const std::string header = absl::StrCat("{", Entry("a", "U8", "[4]", "[0, 4]"), ", ",
                                          Entry("b", "U8", "[4]", "[2, 6]"), "}");
  ExpectRejected(Raw(header, "xxxxxx"),
                 "tensors \"a\" (data_offsets [0, 4]) and \"b\" (data_offsets [2, 6]) overlap");
  // The same bytes twice.
  const std::string same = absl::StrCat("{", Entry("a", "U8", "[4]", "[0, 4]"), ", ",
                                        Entry("b", "I32", "[]", "[0, 4]"), "}");
  ExpectRejected(Raw(same, "xxxx"), "overlap");
  // A zero-size tensor inside another one.
  const std::string inside = absl::StrCat("{", Entry("a", "U8", "[4]", "[0, 4]"), ", ",
                                          Entry("e", "U8", "[0]", "[2, 2]"), "}");
  ExpectRejected(Raw(inside, "xxxx"),
                 "tensors \"a\" (data_offsets [0, 4]) and \"e\" (data_offsets [2, 2]) overlap");
}

TEST(MalformedTest, HoleInDataBuffer) {
  const std::string header = absl::StrCat("{", Entry("a", "U8", "[2]", "[0, 2]"), ", ",
                                          Entry("b", "U8", "[2]", "[3, 5]"), "}");
  ExpectRejected(Raw(header, "xxxxx"),
                 "hole in the data buffer: bytes [2, 3) are not covered by any tensor (between "
                 "\"a\" and \"b\")");
  ExpectRejected(Raw("{" + Entry("b", "U8", "[2]", "[1, 3]") + "}", "xxx"),
                 "bytes [0, 1) are not covered by any tensor (before \"b\")");
}

TEST(MalformedTest, BytesAfterLastTensor) {
  ExpectRejected(Raw("{" + Entry("a", "U8", "[2]", "[0, 2]") + "}", "xxxxx"),
                 "the data buffer has 3 bytes after the last tensor (the buffer is 5 bytes, the "
                 "tensors cover 2)");
  ExpectRejected(Raw("{}", "x"), "the data buffer has 1 bytes after the last tensor");
}

TEST(MalformedTest, MetadataNotAnObject) {
  ExpectRejected(Raw("{\"__metadata__\": [\"a\"]}"),
                 "\"__metadata__\" is not a JSON object: [\"a\"]");
  ExpectRejected(Raw("{\"__metadata__\": null}"), "\"__metadata__\" is not a JSON object: null");
}

TEST(MalformedTest, MetadataValueNotAString) {
  ExpectRejected(Raw("{\"__metadata__\": {\"ok\": \"v\", \"n\": 3}}"),
                 "\"__metadata__\" value of \"n\" is not a string: 3");
  ExpectRejected(Raw("{\"__metadata__\": {\"o\": {}}}"),
                 "\"__metadata__\" value of \"o\" is not a string: {}");
}

TEST(MalformedTest, NamesInMessagesAreEscaped) {
  absl::StatusOr<File> file = File::FromBytes(Raw("{\"a\\u0001\\\"b\": 5}"));
  ASSERT_FALSE(file.ok());
  ExpectInvalid(file.status(), "tensor \"a\\x01\\\"b\": entry is not a JSON object");
  const std::string long_name(1000, 'n');
  file = File::FromBytes(Raw("{\"" + long_name + "\": 5}"));
  ASSERT_FALSE(file.ok());
  EXPECT_LT(file.status().message().size(), 300u) << file.status();
  EXPECT_TRUE(absl::StrContains(file.status().message(), "nnn...\"")) << file.status();
}

// ---- robustness: every truncation and many corruptions are handled --------------------

std::string SampleFile() {
  static const std::vector<float> f = {1.0f, 2.0f, 3.0f};
  static const std::vector<uint8_t> u = Bytes({1, 2, 3, 4, 5});
  Writer writer;
  EXPECT_TRUE(writer.Add("f", ElementType::kF32, {3}, AsBytes(f)).ok());
  EXPECT_TRUE(writer.Add("u", ElementType::kU8, {5, 1}, u).ok());
  EXPECT_TRUE(writer.Add("e", ElementType::kF16, {0}, {}).ok());
  writer.SetMetadata("k", "v");
  return *writer.Serialize();
}

// Checks what a successfully parsed file promises.
void CheckInvariants(const File& file, size_t input_size) {
  size_t total = 0;
  for (const TensorInfo& t : file.tensors()) {
    ASSERT_GE(t.NumElements(), 0);
    ASSERT_EQ(t.size_bytes, static_cast<size_t>(t.NumElements()) * ElementSize(t.type));
    total += t.size_bytes;
    ASSERT_EQ(file.Find(t.name), &t);
    if (t.size_bytes > 0) {
      volatile uint8_t sink = t.data[0] ^ t.data[t.size_bytes - 1];  // in bounds (ASan checks)
      (void)sink;
    }
  }
  ASSERT_LE(total, input_size);
}

TEST(RobustnessTest, EveryTruncationIsRejected) {
  const std::string good = SampleFile();
  ASSERT_TRUE(File::FromBytes(good).ok());
  for (size_t len = 0; len < good.size(); ++len) {
    absl::StatusOr<File> file = File::FromBytes(good.substr(0, len));
    ASSERT_FALSE(file.ok()) << "prefix of " << len << " bytes accepted";
    ASSERT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
    ASSERT_TRUE(absl::StartsWith(file.status().message(), "<bytes>: ")) << file.status();
  }
  EXPECT_FALSE(File::FromBytes(good + "x").ok());
}

TEST(RobustnessTest, CorruptedBytesNeverCrash) {
  const std::string good = SampleFile();
  std::mt19937 rng(12345);
  int accepted = 0;
  // Every byte with a few masks, then random multi-byte corruptions.
  for (size_t pos = 0; pos < good.size(); ++pos) {
    for (int mask : {0x01, 0x20, 0x80, 0xFF}) {
      std::string bad = good;
      bad[pos] = static_cast<char>(bad[pos] ^ mask);
      absl::StatusOr<File> file = File::FromBytes(bad);
      if (file.ok()) {
        ++accepted;
        CheckInvariants(*file, bad.size());
      } else {
        ASSERT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
      }
    }
  }
  const char kAlphabet[] = "{}[]\",:0123456789-. eE\\u_FUIBLOdtypshaf";
  for (int round = 0; round < 20000; ++round) {
    std::string bad = good;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = rng() % bad.size();
      switch (rng() % 3) {
        case 0:
          bad[pos] = kAlphabet[rng() % (sizeof(kAlphabet) - 1)];
          break;
        case 1:
          bad.erase(pos, 1 + rng() % 3);
          break;
        default:
          bad.insert(pos, 1, kAlphabet[rng() % (sizeof(kAlphabet) - 1)]);
          break;
      }
      if (bad.empty()) break;
    }
    if (bad.size() >= 8 && rng() % 2 == 0) {  // keep the length prefix consistent
      const std::string fixed = Le64(HeaderLength(good) + bad.size() - good.size());
      bad.replace(0, 8, fixed);
    }
    absl::StatusOr<File> file = File::FromBytes(bad);
    if (file.ok()) {
      ++accepted;
      CheckInvariants(*file, bad.size());
    } else {
      ASSERT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << file.status();
    }
  }
  // Some corruptions are harmless (e.g. in metadata values or padding).
  EXPECT_GT(accepted, 0);
}

// ---- interoperability with the reference implementation ------------------------------

std::string FixturePath() {
  return std::string(MEDAKV_TEST_DATA_DIR) + "/numpy_fixture.safetensors";
}

// What tests/client/data/make_fixture.py wrote with safetensors.numpy.save_file.
void ExpectFixtureContents(const File& file) {
  EXPECT_EQ(file.metadata(),
            (std::map<std::string, std::string>{{"format", "np"}, {"author", "medakv"}}));
  ASSERT_EQ(file.tensors().size(), 9u);

  const TensorInfo* weight = file.Find("weight");
  ASSERT_NE(weight, nullptr);
  EXPECT_EQ(weight->type, ElementType::kF32);
  EXPECT_EQ(weight->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(Values<float>(*weight),
            (std::vector<float>{1.5f, -2.0f, 3.25f, 0.0f, 100.0f, -0.125f}));

  const TensorInfo* bias = file.Find("bias");
  ASSERT_NE(bias, nullptr);
  EXPECT_EQ(bias->type, ElementType::kF16);
  EXPECT_EQ(bias->shape, (std::vector<int64_t>{2}));
  EXPECT_EQ(Values<uint16_t>(*bias), (std::vector<uint16_t>{0x3800, 0xBC00}));  // 0.5, -1.0

  const TensorInfo* ids = file.Find("ids");
  ASSERT_NE(ids, nullptr);
  EXPECT_EQ(ids->type, ElementType::kI64);
  EXPECT_EQ(Values<int64_t>(*ids), (std::vector<int64_t>{-3, 0, int64_t{1} << 40}));

  const TensorInfo* bytes = file.Find("bytes");
  ASSERT_NE(bytes, nullptr);
  EXPECT_EQ(bytes->type, ElementType::kU8);
  EXPECT_EQ(TensorBytes(*bytes), Bytes({0, 7, 255}));

  const TensorInfo* mask = file.Find("mask");
  ASSERT_NE(mask, nullptr);
  EXPECT_EQ(mask->type, ElementType::kBool);
  EXPECT_EQ(TensorBytes(*mask), Bytes({1, 0, 1, 1}));

  const TensorInfo* step = file.Find("step");
  ASSERT_NE(step, nullptr);
  EXPECT_EQ(step->type, ElementType::kI32);
  EXPECT_TRUE(step->shape.empty());
  EXPECT_EQ(step->NumElements(), 1);
  EXPECT_EQ(Values<int32_t>(*step), (std::vector<int32_t>{42}));

  const TensorInfo* empty = file.Find("empty");
  ASSERT_NE(empty, nullptr);
  EXPECT_EQ(empty->type, ElementType::kF64);
  EXPECT_EQ(empty->shape, (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(empty->size_bytes, 0u);

  const TensorInfo* small = file.Find("small");
  ASSERT_NE(small, nullptr);
  EXPECT_EQ(small->type, ElementType::kI8);
  EXPECT_EQ(Values<int8_t>(*small), (std::vector<int8_t>{-128, 127}));

  const TensorInfo* wide = file.Find("wide");
  ASSERT_NE(wide, nullptr);
  EXPECT_EQ(wide->type, ElementType::kU16);
  EXPECT_EQ(Values<uint16_t>(*wide), (std::vector<uint16_t>{65535, 1}));
}

TEST(InteropTest, ReadsReferenceFile) {
  absl::StatusOr<File> file = File::Open(FixturePath());
  ASSERT_TRUE(file.ok()) << file.status();
  ExpectFixtureContents(*file);
  // The reference writer orders the data buffer by alignment, then name; a
  // zero-size tensor sorts before the tensor at the same offset.
  std::vector<std::string> order;
  for (const TensorInfo& t : file->tensors()) order.push_back(t.name);
  EXPECT_EQ(order, (std::vector<std::string>{"ids", "empty", "weight", "step", "bias", "wide",
                                             "small", "bytes", "mask"}));
}

class InteropFileTest : public TempDirTest {};

TEST_F(InteropFileTest, OurWriterReproducesReferenceFile) {
  absl::StatusOr<File> reference = File::Open(FixturePath());
  ASSERT_TRUE(reference.ok()) << reference.status();
  Writer writer;
  for (const TensorInfo& t : reference->tensors()) {
    ASSERT_TRUE(writer.Add(t.name, t.type, t.shape, absl::MakeConstSpan(t.data, t.size_bytes)).ok())
        << t.name;
  }
  for (const auto& [key, value] : reference->metadata()) writer.SetMetadata(key, value);

  absl::StatusOr<std::string> bytes = writer.Serialize();
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  absl::StatusOr<File> ours = File::FromBytes(*bytes);
  ASSERT_TRUE(ours.ok()) << ours.status();
  ExpectFixtureContents(*ours);
  ASSERT_EQ(ours->tensors().size(), reference->tensors().size());
  for (size_t i = 0; i < ours->tensors().size(); ++i) {
    const TensorInfo& a = ours->tensors()[i];
    const TensorInfo& b = reference->tensors()[i];
    EXPECT_EQ(a.name, b.name);
    EXPECT_EQ(a.type, b.type);
    EXPECT_EQ(a.shape, b.shape);
    EXPECT_EQ(TensorBytes(a), TensorBytes(b)) << a.name;
  }

  const std::string path = Path("ours.safetensors");
  ASSERT_TRUE(writer.WriteFile(path).ok());
  absl::StatusOr<File> reopened = File::Open(path);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  ExpectFixtureContents(*reopened);
}

}  // namespace
}  // namespace medakv::safetensors
