// Status helpers missing from the Debian Abseil (20220623).
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MEDAKV_STATUS_CONCAT_INNER(a, b) a##b
#define MEDAKV_STATUS_CONCAT(a, b) MEDAKV_STATUS_CONCAT_INNER(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define MEDAKV_RETURN_IF_ERROR(expr)                       \
  do {                                                     \
    ::absl::Status medakv_status_ = (expr);                \
    if (!medakv_status_.ok()) return medakv_status_;       \
  } while (false)

// `MEDAKV_ASSIGN_OR_RETURN(auto x, Foo());` assigns the value of an
// absl::StatusOr or returns its status from the enclosing function.
#define MEDAKV_ASSIGN_OR_RETURN(lhs, expr) \
  MEDAKV_ASSIGN_OR_RETURN_IMPL(MEDAKV_STATUS_CONCAT(medakv_statusor_, __LINE__), lhs, expr)

#define MEDAKV_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                                 \
  if (!tmp.ok()) return std::move(tmp).status();     \
  lhs = *std::move(tmp)
