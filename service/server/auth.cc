#include "service/server/auth.h"

#include <algorithm>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "service/server/config_file.h"
#include "service/store/cache_store.h"

namespace medakv::server {
namespace {

constexpr int64_t kMaxTokensFileBytes = 4 << 20;

bool TokenChar(char c) { return c > ' ' && c < 0x7f; }

// Equal in a time that depends on the lengths only.
bool ConstantTimeEqual(absl::string_view a, absl::string_view b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned diff = a.size() == b.size() ? 0u : 1u;
  for (size_t i = 0; i < n; ++i) {
    const unsigned x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0u;
    const unsigned y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0u;
    diff |= x ^ y;
  }
  return diff == 0;
}

absl::Status Unauthenticated(absl::string_view why) {
  return absl::UnauthenticatedError(
      absl::StrCat(why, ": this server needs a bearer token (send `authorization: Bearer TOKEN` metadata; "
                        "medakv --token, the Python client's token=)"));
}

}  // namespace

absl::StatusOr<std::shared_ptr<const TokenTable>> TokenTable::Parse(absl::string_view text,
                                                                     absl::string_view source) {
  std::vector<std::pair<std::string, std::string>> entries;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    const std::string at = absl::StrCat(source, ":", line_number, ": ");
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<absl::string_view> fields = absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(at, "expected `TOKEN TENANT`, got ", fields.size(), " field", fields.size() == 1 ? "" : "s"));
    }
    const absl::string_view token = fields[0];
    const absl::string_view tenant = fields[1];
    if (token.size() < kMinTokenBytes || token.size() > kMaxTokenBytes) {
      return absl::InvalidArgumentError(absl::StrCat(at, "the token must be ", kMinTokenBytes, "-", kMaxTokenBytes,
                                                     " bytes, got ", token.size()));
    }
    if (!std::all_of(token.begin(), token.end(), TokenChar)) {
      return absl::InvalidArgumentError(absl::StrCat(at, "the token must be printable ASCII"));
    }
    if (absl::Status s = ValidateTenant(tenant); !s.ok()) return absl::InvalidArgumentError(absl::StrCat(at, s.message()));
    if (tenant.empty()) return absl::InvalidArgumentError(absl::StrCat(at, "empty tenant"));
    for (const auto& [other, unused] : entries) {
      if (other == token) return absl::InvalidArgumentError(absl::StrCat(at, "the token appears twice"));
    }
    if (entries.size() >= kMaxTokens) {
      return absl::InvalidArgumentError(absl::StrCat(at, "more than ", kMaxTokens, " tokens"));
    }
    entries.emplace_back(std::string(token), std::string(tenant));
  }
  if (entries.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": no token (one `TOKEN TENANT` pair per line); a server without tokens would refuse "
                             "every call"));
  }
  return std::shared_ptr<const TokenTable>(new TokenTable(std::move(entries)));
}

absl::StatusOr<std::shared_ptr<const TokenTable>> TokenTable::Load(const std::string& path) {
  absl::StatusOr<std::string> text = ReadConfigFile(path, "--auth_tokens_file", kMaxTokensFileBytes);
  if (!text.ok()) return text.status();
  return Parse(*text, path);
}

const std::string* TokenTable::Find(absl::string_view token) const {
  const std::string* found = nullptr;
  for (const auto& [candidate, tenant] : entries_) {
    if (ConstantTimeEqual(candidate, token) && found == nullptr) found = &tenant;
  }
  return found;
}

size_t TokenTable::tenants() const {
  std::set<absl::string_view> names;
  for (const auto& [unused, tenant] : entries_) names.insert(tenant);
  return names.size();
}

absl::StatusOr<absl::string_view> BearerToken(absl::string_view authorization) {
  constexpr absl::string_view kScheme = "bearer";
  if (authorization.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(authorization.substr(0, kScheme.size()), kScheme) ||
      authorization[kScheme.size()] != ' ') {
    return Unauthenticated("the authorization metadata is not `Bearer TOKEN`");
  }
  absl::string_view token = absl::StripLeadingAsciiWhitespace(authorization.substr(kScheme.size()));
  if (token.empty()) return Unauthenticated("the bearer token is empty");
  return token;
}

absl::StatusOr<std::unique_ptr<Authenticator>> Authenticator::Create(std::string path) {
  std::unique_ptr<Authenticator> auth(new Authenticator(std::move(path)));
  if (auth->enabled()) {
    if (absl::Status s = auth->Reload(); !s.ok()) return s;
  }
  return auth;
}

absl::Status Authenticator::Reload() {
  if (!enabled()) return absl::FailedPreconditionError("authentication is off (no --auth_tokens_file)");
  absl::StatusOr<std::shared_ptr<const TokenTable>> tokens = TokenTable::Load(path_);
  if (!tokens.ok()) return tokens.status();
  absl::MutexLock lock(&mu_);
  tokens_ = *std::move(tokens);
  return absl::OkStatus();
}

std::shared_ptr<const TokenTable> Authenticator::tokens() const {
  absl::MutexLock lock(&mu_);
  return tokens_;
}

grpc::Status TokenAuthProcessor::Process(const InputMetadata& auth_metadata, grpc::AuthContext*, OutputMetadata*,
                                         OutputMetadata*) {
  const auto it = auth_metadata.find("authorization");
  if (it == auth_metadata.end()) return grpc::Status::OK;  // the handlers refuse it (the health service does not)
  const absl::string_view value(it->second.data(), it->second.size());
  absl::StatusOr<absl::string_view> token = BearerToken(value);
  if (!token.ok()) return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, std::string(token.status().message()));
  const std::shared_ptr<const TokenTable> tokens = auth_->tokens();
  const std::string* tenant = tokens == nullptr ? nullptr : tokens->Find(*token);
  if (tenant == nullptr) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        std::string(Unauthenticated("the bearer token is not valid").message()));
  }
  // No AddProperty: gRPC 1.51 adds it to the connection's auth context, so
  // it would outlive the call and name the tenant of later calls on the
  // connection that carry no token (security_test checks this). The handlers
  // look the token up again (CallerTenant); nothing is consumed.
  return grpc::Status::OK;
}

absl::StatusOr<std::string> CallerTenant(const grpc::ServerContextBase& context, const Authenticator& auth) {
  if (!auth.enabled()) return std::string();
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) return Unauthenticated("no bearer token");
  absl::StatusOr<absl::string_view> token = BearerToken(absl::string_view(it->second.data(), it->second.size()));
  if (!token.ok()) return token.status();
  const std::shared_ptr<const TokenTable> tokens = auth.tokens();
  const std::string* tenant = tokens == nullptr ? nullptr : tokens->Find(*token);
  if (tenant == nullptr) return Unauthenticated("the bearer token is not valid");
  return *tenant;
}

}  // namespace medakv::server
