// Authentication and tenants (SECURITY.md): bearer tokens from
// --auth_tokens_file, each mapped to a tenant; every medakv call names its
// tenant, and the cache store and the shared-memory registry keep tenants
// apart. Without a tokens file there is one tenant, "", and no check.
//
// How a call is authenticated:
//  - on a TLS port, TokenAuthProcessor (a gRPC AuthMetadataProcessor) checks
//    the `authorization: Bearer TOKEN` metadata when the call arrives: an
//    invalid token fails the call UNAUTHENTICATED before any handler runs; a
//    call without one passes on (the health service needs no token) to be
//    refused by the medakv handlers;
//  - every medakv handler then calls CallerTenant, which maps the call's own
//    token to its tenant (UNAUTHENTICATED without a valid one): on plaintext
//    ports and in-process channels, where gRPC runs no auth processor, this is
//    the only check. The tenant is never taken from the auth context: gRPC
//    1.51 keeps properties that a processor adds on the connection, where
//    they would name the tenant of later calls without a token.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <grpcpp/security/auth_metadata_processor.h>
#include <grpcpp/server_context.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace medakv::server {

inline constexpr size_t kMinTokenBytes = 16;
inline constexpr size_t kMaxTokenBytes = 512;
inline constexpr size_t kMaxTokens = 10000;

// The tokens of a --auth_tokens_file: one `TOKEN TENANT` pair per line,
// separated by spaces or tabs; blank lines and lines starting with `#` are
// skipped. A token is 16-512 printable ASCII bytes without spaces, unique in
// the file; a tenant 1-64 bytes of [A-Za-z0-9._-] (ValidateTenant). A tenant
// may have several tokens (for rotation). Immutable once built.
class TokenTable {
 public:
  // INVALID_ARGUMENT naming "SOURCE:LINE" and the rule broken (the token
  // itself is never quoted), also for a file with no token.
  static absl::StatusOr<std::shared_ptr<const TokenTable>> Parse(absl::string_view text, absl::string_view source);
  static absl::StatusOr<std::shared_ptr<const TokenTable>> Load(const std::string& path);

  // The tenant of `token`; nullptr when it is not a token of the table. Takes
  // the same time for every token of a given length whether it matches or
  // not (it compares with every entry without stopping early).
  const std::string* Find(absl::string_view token) const;

  size_t size() const { return entries_.size(); }
  size_t tenants() const;

 private:
  explicit TokenTable(std::vector<std::pair<std::string, std::string>> entries) : entries_(std::move(entries)) {}
  std::vector<std::pair<std::string, std::string>> entries_;  // (token, tenant)
};

// The token of an `authorization` metadata value: "Bearer TOKEN" (the scheme
// in any case, one or more spaces). UNAUTHENTICATED saying what is wrong
// (never quoting the value) otherwise.
[[nodiscard]] absl::StatusOr<absl::string_view> BearerToken(absl::string_view authorization);

// The server's tokens; Reload swaps them while calls run (SIGHUP).
class Authenticator {
 public:
  // `path` empty: authentication off (every call is the "" tenant).
  static absl::StatusOr<std::unique_ptr<Authenticator>> Create(std::string path);

  bool enabled() const { return !path_.empty(); }
  // Reads the file again; on error the tokens in use stay.
  [[nodiscard]] absl::Status Reload();
  std::shared_ptr<const TokenTable> tokens() const;

 private:
  explicit Authenticator(std::string path) : path_(std::move(path)) {}
  const std::string path_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const TokenTable> tokens_ ABSL_GUARDED_BY(mu_);
};

// Installed on TLS server credentials when authentication is on: refuses
// invalid tokens early (see above); sets nothing.
class TokenAuthProcessor final : public grpc::AuthMetadataProcessor {
 public:
  explicit TokenAuthProcessor(const Authenticator* auth) : auth_(auth) {}
  bool IsBlocking() const override { return false; }  // a table lookup: runs inline
  grpc::Status Process(const InputMetadata& auth_metadata, grpc::AuthContext* context,
                       OutputMetadata* consumed_auth_metadata, OutputMetadata* response_metadata) override;

 private:
  const Authenticator* auth_;
};

// The calling tenant: "" when authentication is off; else the tenant that
// the call's bearer token maps to; UNAUTHENTICATED
// ("... send `authorization: Bearer TOKEN` metadata ...") without a valid one.
[[nodiscard]] absl::StatusOr<std::string> CallerTenant(const grpc::ServerContextBase& context,
                                                       const Authenticator& auth);

}  // namespace medakv::server
