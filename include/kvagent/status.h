// Status and StatusOr<T>: the one error model of kv-agent.
//
// Every fallible operation in the C++ core returns Status or StatusOr<T>. Codes follow
// Abseil/gRPC canonical codes. The Python bindings map each non-OK code to one exception
// class (kv_agent.errors). Both types are [[nodiscard]]: ignoring an error is a compile warning
// (an error with -Werror).
//
// Thread-safety: values; safe to copy between threads.
#pragma once

#include <cassert>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace kvagent {

enum class StatusCode : int {
  kOk = 0,
  kCancelled = 1,
  kUnknown = 2,
  kInvalidArgument = 3,
  kDeadlineExceeded = 4,
  kNotFound = 5,
  kAlreadyExists = 6,
  kPermissionDenied = 7,
  kResourceExhausted = 8,
  kFailedPrecondition = 9,
  kAborted = 10,
  kOutOfRange = 11,
  kUnimplemented = 12,
  kInternal = 13,
  kUnavailable = 14,
  kDataLoss = 15,
};

// Canonical upper-camel name of a code ("InvalidArgument"); "Unknown" for values out of range.
std::string_view StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  Status(StatusCode code, std::string message);

  static Status Ok() { return Status(); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  // "InvalidArgument: message", or "OK".
  std::string ToString() const;

  // Returns a copy whose message is prefixed with `context` ("context: message").
  Status WithContext(std::string_view context) const;

  // Explicitly discards the status (for best-effort cleanup paths).
  void IgnoreError() const {}

  friend bool operator==(const Status& a, const Status& b) {
    return a.code_ == b.code_ && a.message_ == b.message_;
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

Status CancelledError(std::string message);
Status UnknownError(std::string message);
Status InvalidArgumentError(std::string message);
Status DeadlineExceededError(std::string message);
Status NotFoundError(std::string message);
Status AlreadyExistsError(std::string message);
Status PermissionDeniedError(std::string message);
Status ResourceExhaustedError(std::string message);
Status FailedPreconditionError(std::string message);
Status AbortedError(std::string message);
Status OutOfRangeError(std::string message);
Status UnimplementedError(std::string message);
Status InternalError(std::string message);
Status UnavailableError(std::string message);
Status DataLossError(std::string message);

// Status from an errno value: ENOENT -> NotFound, ENOSPC/EDQUOT -> ResourceExhausted,
// EACCES/EPERM -> PermissionDenied, EEXIST -> AlreadyExists, others -> Internal.
Status ErrnoToStatus(int err, std::string_view context);

// Holds either a value or a non-OK Status. Accessing value() of an error aborts in debug
// builds; callers check ok() first.
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  // An OK status without a value is a programming error; it becomes Internal (and asserts).
  StatusOr(Status status)  // NOLINT(google-explicit-constructor)
      : status_(status.ok() ? InternalError("StatusOr constructed from OK status without value") : std::move(status)) {
    assert(!status_.ok());
  }
  StatusOr(T value) : value_(std::move(value)) {}  // NOLINT(google-explicit-constructor)

  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }

  T& value() & {
    assert(ok());
    return *value_;
  }
  const T& value() const& {
    assert(ok());
    return *value_;
  }
  T&& value() && {
    assert(ok());
    return std::move(*value_);
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  Status status_;
  std::optional<T> value_;
};

}  // namespace kvagent

#define KVAGENT_CONCAT_INNER_(a, b) a##b
#define KVAGENT_CONCAT_(a, b) KVAGENT_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (a Status) is not OK.
#define KVAGENT_RETURN_IF_ERROR(expr)                       \
  do {                                                      \
    ::kvagent::Status kvagent_status_ = (expr);             \
    if (!kvagent_status_.ok()) return kvagent_status_;      \
  } while (0)

// `lhs = value of expr` or return its error. lhs may declare a variable: `auto x`.
#define KVAGENT_ASSIGN_OR_RETURN(lhs, expr) \
  KVAGENT_ASSIGN_OR_RETURN_IMPL_(KVAGENT_CONCAT_(kvagent_statusor_, __LINE__), lhs, expr)
#define KVAGENT_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                   \
  if (!tmp.ok()) return tmp.status();                  \
  lhs = std::move(tmp).value()
