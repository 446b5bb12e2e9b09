#include "service/server/presets.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "service/server/config_file.h"
#include "service/server/convert.h"

namespace medakv {
namespace {

namespace v1 = ::medakv::v1;

// Largest presets file read (a table of 64 presets is a few KiB).
constexpr int64_t kMaxPresetsFileBytes = 1 << 20;

bool NameStart(char c) { return absl::ascii_islower(c) || absl::ascii_isdigit(c); }
bool NameRest(char c) { return NameStart(c) || c == '_' || c == '.' || c == '-'; }

// Collects the text-format parser's first error with its position.
class FirstError : public google::protobuf::io::ErrorCollector {
 public:
  void AddError(int line, google::protobuf::io::ColumnNumber column, const std::string& message) override {
    if (!has_error_) {
      has_error_ = true;
      line_ = line;
      column_ = column;
      message_ = message;
    }
  }
  void AddWarning(int, google::protobuf::io::ColumnNumber, const std::string&) override {}

  bool has_error() const { return has_error_; }
  // "SOURCE:LINE:COLUMN: message", 1-based (the parser's are 0-based).
  std::string Format(absl::string_view source) const {
    return absl::StrCat(source, ":", line_ + 1, ":", column_ + 1, ": ", message_);
  }

 private:
  bool has_error_ = false;
  int line_ = 0;
  int column_ = 0;
  std::string message_;
};

absl::StatusOr<std::vector<PresetTable::Preset>> Build(const v1::PolicyPresets& presets, absl::string_view source,
                                                       const google::protobuf::TextFormat::ParseInfoTree* where) {
  // "SOURCE" or "SOURCE:LINE" of preset i.
  auto at = [&](int i) -> std::string {
    if (where == nullptr) return std::string(source);
    const google::protobuf::TextFormat::ParseLocation loc =
        where->GetLocation(v1::PolicyPresets::descriptor()->FindFieldByName("preset"), i);
    return loc.line >= 0 ? absl::StrCat(source, ":", loc.line + 1) : std::string(source);
  };
  if (presets.preset_size() > kMaxPresets) {
    return absl::InvalidArgumentError(
        absl::StrCat(at(kMaxPresets), ": ", presets.preset_size(), " presets, at most ", kMaxPresets));
  }
  std::vector<PresetTable::Preset> list;
  for (int i = 0; i < presets.preset_size(); ++i) {
    const v1::PolicyPreset& p = presets.preset(i);
    auto fail = [&](absl::string_view what) {
      return absl::InvalidArgumentError(absl::StrCat(at(i), ": preset ", i + 1, " ('", p.name(), "'): ", what));
    };
    if (absl::Status s = ValidatePresetName(p.name()); !s.ok()) return fail(s.message());
    for (const PresetTable::Preset& seen : list) {
      if (seen.name == p.name()) return fail("the name is used by an earlier preset");
    }
    if (!p.has_policy()) return fail("no policy (write policy { rho: ... meda { ... } } or another kind)");
    if (!p.policy().preset().empty()) return fail("policy.preset: a preset cannot name another preset");
    absl::StatusOr<CompressOptions> options = OptionsFromProto(p.policy());
    if (!options.ok()) return fail(options.status().message());
    list.push_back(PresetTable::Preset{p.name(), p.description(), p.policy(), *options});
  }
  return list;
}

}  // namespace

absl::Status ValidatePresetName(absl::string_view name) {
  if (name.empty()) return absl::InvalidArgumentError("name: must not be empty");
  if (name.size() > kMaxPresetName) {
    return absl::InvalidArgumentError(
        absl::StrCat("name '", name, "': ", name.size(), " characters, at most ", kMaxPresetName));
  }
  if (!NameStart(name[0])) {
    return absl::InvalidArgumentError(
        absl::StrCat("name '", name, "': must start with a lower-case letter or a digit"));
  }
  for (char c : name) {
    if (!NameRest(c)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "name '", name, "': only lower-case letters, digits, '_', '.' and '-' are allowed"));
    }
  }
  if (name == "none") return absl::InvalidArgumentError("name 'none' is reserved (the metrics' label of no preset)");
  return absl::OkStatus();
}

PresetTable::PresetTable(std::vector<Preset> presets) : presets_(std::move(presets)) {}

absl::StatusOr<std::shared_ptr<const PresetTable>> PresetTable::FromProto(const v1::PolicyPresets& presets,
                                                                        absl::string_view source) {
  absl::StatusOr<std::vector<Preset>> list = Build(presets, source, nullptr);
  if (!list.ok()) return list.status();
  return std::shared_ptr<const PresetTable>(new PresetTable(*std::move(list)));
}

absl::StatusOr<std::shared_ptr<const PresetTable>> PresetTable::Parse(absl::string_view text,
                                                                    absl::string_view source) {
  google::protobuf::TextFormat::Parser parser;
  FirstError errors;
  google::protobuf::TextFormat::ParseInfoTree where;
  parser.RecordErrorsTo(&errors);
  parser.WriteLocationsTo(&where);
  v1::PolicyPresets presets;
  if (!parser.ParseFromString(std::string(text), &presets)) {
    if (errors.has_error()) return absl::InvalidArgumentError(errors.Format(source));
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a PolicyPresets in protobuf text format"));
  }
  absl::StatusOr<std::vector<Preset>> list = Build(presets, source, &where);
  if (!list.ok()) return list.status();
  return std::shared_ptr<const PresetTable>(new PresetTable(*std::move(list)));
}

absl::StatusOr<std::shared_ptr<const PresetTable>> PresetTable::Load(const std::string& path) {
  absl::StatusOr<std::string> text = ReadConfigFile(path, "--policy_presets", kMaxPresetsFileBytes);
  if (!text.ok()) return text.status();
  return Parse(*text, path);
}

const PresetTable::Preset* PresetTable::Find(absl::string_view name) const {
  for (const Preset& p : presets_) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

absl::StatusOr<ResolvedPolicy> PresetTable::Resolve(const v1::Policy& policy, bool reconstruction) const {
  ResolvedPolicy r;
  const Preset* preset = nullptr;
  if (!policy.preset().empty()) {
    if (policy.kind_case() != v1::Policy::KIND_NOT_SET) {
      return absl::InvalidArgumentError(absl::StrCat("policy.preset '", policy.preset(),
                                                     "' and a policy kind are both set; set one of them"));
    }
    preset = Find(policy.preset());
    if (preset == nullptr) {
      std::vector<std::string> names;
      for (const Preset& p : presets_) names.push_back(p.name);
      return absl::InvalidArgumentError(
          names.empty() ? absl::StrCat("policy.preset '", policy.preset(),
                                       "': this server has no presets (medakv-server --policy_presets)")
                        : absl::StrCat("policy.preset '", policy.preset(), "': no such preset (this server has: ",
                                       absl::StrJoin(names, ", "), ")"));
    }
  } else if (policy.kind_case() == v1::Policy::KIND_NOT_SET) {
    preset = Find(reconstruction ? kReconstructionPresetName : "default");
  }
  if (preset == nullptr) {
    absl::StatusOr<CompressOptions> o = OptionsFromProto(policy);
    if (!o.ok()) return o.status();
    r.options = *o;
    if (reconstruction && policy.preset().empty() && policy.kind_case() == v1::Policy::KIND_NOT_SET) {
      r.options = ReconstructionOptions();
      if (policy.rho() != 0.0) r.options.budget.rho = o->budget.rho;  // checked by OptionsFromProto
    }
    return r;
  }
  r.options = preset->options;
  r.preset = preset->name;
  if (policy.rho() != 0.0) {
    const double rho = policy.rho();
    if (!(rho > 0.0 && rho <= 1.0)) {
      return absl::InvalidArgumentError(absl::StrCat("policy.rho must be in (0, 1] (0: the preset's ",
                                                     preset->options.budget.rho, "), got ", rho));
    }
    r.options.budget.rho = rho;
  }
  return r;
}

std::string PresetsToText(const v1::PolicyPresets& presets, absl::string_view header) {
  std::string out;
  for (absl::string_view line : absl::StrSplit(header, '\n', absl::SkipEmpty())) absl::StrAppend(&out, "# ", line, "\n");
  google::protobuf::TextFormat::Printer printer;
  for (const v1::PolicyPreset& p : presets.preset()) {
    v1::PolicyPresets one;
    *one.add_preset() = p;
    std::string text;
    printer.PrintToString(one, &text);
    absl::StrAppend(&out, "\n", text);
  }
  return out;
}

}  // namespace medakv
