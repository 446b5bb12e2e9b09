#include "service/server/config_file.h"

#include <cerrno>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace medakv {

absl::StatusOr<std::string> ReadConfigFile(const std::string& path, absl::string_view flag, int64_t max_bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    return absl::ErrnoToStatus(err, absl::StrCat(flag, " ", path, ": cannot open"));
  }
  std::string text(static_cast<size_t>(max_bytes) + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(max_bytes) + 1);
  if (in.bad()) return absl::DataLossError(absl::StrCat(flag, " ", path, ": read error"));
  text.resize(static_cast<size_t>(in.gcount()));
  if (static_cast<int64_t>(text.size()) > max_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, ": larger than ", max_bytes, " bytes"));
  }
  return text;
}

absl::StatusOr<std::string> ReadPemFile(const std::string& path, absl::string_view what) {
  absl::StatusOr<std::string> pem = ReadConfigFile(path, what, int64_t{1} << 20);
  if (pem.ok() && !absl::StrContains(*pem, "-----BEGIN ")) {
    return absl::InvalidArgumentError(absl::StrCat(what, " ", path, ": not a PEM file (no -----BEGIN line)"));
  }
  return pem;
}

}  // namespace medakv
