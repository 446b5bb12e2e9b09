// Reading the small files that the server's flags name (presets, tokens,
// TLS certificates and keys), with errors that name the flag and the path.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace medakv {

// The whole file. Errors name `flag` and `path`: the errno's status ("--flag
// PATH: cannot open: No such file or directory"), DATA_LOSS for a read
// error, INVALID_ARGUMENT for a file larger than `max_bytes`.
[[nodiscard]] absl::StatusOr<std::string> ReadConfigFile(const std::string& path, absl::string_view flag,
                                                          int64_t max_bytes);

// A PEM file (certificates or a key) of at most 1 MiB, as ReadConfigFile
// with `what` naming it, and INVALID_ARGUMENT ("WHAT PATH: not a PEM file")
// for a file without a "-----BEGIN " line.
[[nodiscard]] absl::StatusOr<std::string> ReadPemFile(const std::string& path, absl::string_view what);

}  // namespace medakv
