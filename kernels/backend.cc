#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/common/device_memory.h"
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
    if (!compiled || devices == 0) {
      if (why) *why = !compiled ? "cpu backend: built without CUDA" : "cpu backend: no CUDA device";
      return MakeCpuBackend();
    }
    absl::StatusOr<std::unique_ptr<Backend>> cuda = MakeCudaBackend();
    if (!cuda.ok()) {
      // A device that is listed but unusable (driver mismatch, out of memory)
      // leaves the service working on the CPU; the log says why.
      if (why) *why = absl::StrCat("cpu backend: the CUDA device could not be used: ", cuda.status().message());
      return MakeCpuBackend();
    }
    if (why) *why = absl::StrCat("cuda backend: ", devices, " CUDA device(s) found, using the current one");
    return cuda;
  }
  if (name == "cuda") {
    if (!compiled) return absl::FailedPreconditionError("--backend=cuda: this binary was built without CUDA");
    if (devices == 0) return absl::FailedPreconditionError("--backend=cuda: no CUDA device is visible");
    if (why) *why = "cuda backend requested";
    return MakeCudaBackend();
  }
  return absl::InvalidArgumentError(absl::StrCat("--backend must be auto, cpu or cuda, got '", absl::string_view(name.data(), name.size()), "'"));
}

}  // namespace medakv

#if !defined(MEDAKV_HAVE_CUDA)
namespace medakv {
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend() {
  return absl::FailedPreconditionError("this binary was built without CUDA");
}
absl::StatusOr<std::shared_ptr<DeviceMemory>> MakeCudaDeviceMemory() {
  return absl::FailedPreconditionError("this binary was built without CUDA");
}
}  // namespace medakv
#endif
