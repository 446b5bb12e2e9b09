#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/cuda/device.h"

namespace medakv {

absl::StatusOr<std::unique_ptr<Backend>> MakeBackend(std::string_view name, std::string* why) {
  const bool compiled = cuda::Compiled();
  const int devices = cuda::DeviceCount();
  if (name == "cpu") {
    if (why) *why = "cpu backend requested";
    return MakeCpuBackend();
  }
  if (name == "auto") {
    if (why) {
      *why = !compiled     ? "cpu backend: built without CUDA"
             : devices == 0 ? "cpu backend: no CUDA device"
                            : absl::StrCat("cpu backend: ", devices,
                                           " CUDA device(s) found, but the CUDA backend is not implemented yet");
    }
    return MakeCpuBackend();
  }
  if (name == "cuda") {
    if (!compiled) return absl::FailedPreconditionError("--backend=cuda: this binary was built without CUDA");
    if (devices == 0) return absl::FailedPreconditionError("--backend=cuda: no CUDA device is visible");
    return absl::UnimplementedError("--backend=cuda: the CUDA backend is not implemented yet (use auto or cpu)");
  }
  return absl::InvalidArgumentError(absl::StrCat("--backend must be auto, cpu or cuda, got '", absl::string_view(name.data(), name.size()), "'"));
}

}  // namespace medakv
