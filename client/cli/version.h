// `medakv --version`: the project's version (CMake's project(VERSION), the
// one source; medakv-server reports the same) and the git commit that the
// binary was built from, when it was built in a git checkout.
#pragma once

#include <string>

#include "absl/strings/string_view.h"

namespace medakv {

// "PROGRAM VERSION" and, when known at build time, " (git COMMIT)".
std::string VersionString(absl::string_view program);

}  // namespace medakv
