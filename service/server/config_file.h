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

}  // namespace medakv
