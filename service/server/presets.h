// Policy presets (docs/presets.md): named policies that the server loads from
// --policy_presets at start-up and that requests select by name
// (`policy.preset`), e.g. the output of `medakv tune`.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "medakv/v1/medakv.pb.h"
#include "service/compress/options.h"

namespace medakv {

inline constexpr int kMaxPresets = 64;
inline constexpr size_t kMaxPresetName = 64;

// A preset name: 1-64 characters, [a-z0-9] then [a-z0-9_.-]; not "none" (the
// metrics' `preset` label of requests without one). INVALID_ARGUMENT
// otherwise, naming the rule broken.
[[nodiscard]] absl::Status ValidatePresetName(absl::string_view name);

// The preset a request that names no policy gets when it carries a
// reconstruction pass (PresetTable::Resolve).
inline constexpr char kReconstructionPresetName[] = "default_reconstruct";

// A request's policy after its preset (if any) is applied.
struct ResolvedPolicy {
  CompressOptions options;
  std::string preset;  // the preset that gave the options; empty when none did
};

// The server's presets: loaded once at start-up, then immutable (share it
// freely between threads).
class PresetTable {
 public:
  struct Preset {
    std::string name;
    std::string description;
    medakv::v1::Policy policy;  // as written in the file
    CompressOptions options;    // OptionsFromProto(policy)
  };

  // A table with no preset: Resolve is OptionsFromProto.
  PresetTable() = default;

  // Checks every preset: a valid and unique name (ValidatePresetName), at
  // most kMaxPresets presets, no `policy.preset` (a preset may not name a
  // preset) and options that OptionsFromProto accepts. Errors are
  // INVALID_ARGUMENT "SOURCE: preset 3 ('name'): ..." (`source` names where
  // the presets came from, e.g. the file; presets count from 1).
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<const PresetTable>> FromProto(
      const medakv::v1::PolicyPresets& presets, absl::string_view source);
  // Parses a PolicyPresets in protobuf text format, then FromProto. Syntax
  // errors are INVALID_ARGUMENT "SOURCE:LINE:COLUMN: message" (1-based);
  // the other errors carry the line of the preset too ("SOURCE:LINE: preset
  // 3 ('name'): ...").
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<const PresetTable>> Parse(absl::string_view text,
                                                                              absl::string_view source);
  // Reads and parses a file (errors name the path; a file that cannot be
  // read keeps its errno's code, e.g. NOT_FOUND).
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<const PresetTable>> Load(const std::string& path);

  // A request's policy:
  //   - `preset` set: the preset's options; INVALID_ARGUMENT when the policy
  //     also sets a kind, or for a name the table does not have (the message
  //     lists the table's names, or says it has none);
  //   - neither `preset` nor a kind: the preset named "default" when the
  //     table has one, else OptionsFromProto (amber with its defaults);
  //     for a `reconstruction` request (probe rows after the cache, as a
  //     pass that repeats the context sends: rows that carry
  //     query_outside_lse, or that outnumber the tokens) the preset named
  //     "default_reconstruct", else ReconstructionOptions;
  //   - a kind: OptionsFromProto.
  // With a preset or the reconstruction default, a rho > 0 replaces its rho
  // (checked as OptionsFromProto checks it).
  [[nodiscard]] absl::StatusOr<ResolvedPolicy> Resolve(const medakv::v1::Policy& policy,
                                                       bool reconstruction = false) const;

  const std::vector<Preset>& presets() const { return presets_; }
  const Preset* Find(absl::string_view name) const;  // nullptr when absent
  bool empty() const { return presets_.empty(); }
  size_t size() const { return presets_.size(); }

 private:
  explicit PresetTable(std::vector<Preset> presets);
  std::vector<Preset> presets_;  // in the order of the file
};

// The text-format file of `presets` (what PresetTable::Parse reads back),
// with a comment line per preset holding its description; `header` lines
// (each prefixed "# ") come first. Used by `medakv tune`.
std::string PresetsToText(const medakv::v1::PolicyPresets& presets, absl::string_view header);

}  // namespace medakv
