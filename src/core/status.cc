#include "kvagent/status.h"

#include <cerrno>
#include <cstring>

namespace kvagent {

std::string_view StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kCancelled: return "Cancelled";
    case StatusCode::kUnknown: return "Unknown";
    case StatusCode::kInvalidArgument: return "InvalidArgument";
    case StatusCode::kDeadlineExceeded: return "DeadlineExceeded";
    case StatusCode::kNotFound: return "NotFound";
    case StatusCode::kAlreadyExists: return "AlreadyExists";
    case StatusCode::kPermissionDenied: return "PermissionDenied";
    case StatusCode::kResourceExhausted: return "ResourceExhausted";
    case StatusCode::kFailedPrecondition: return "FailedPrecondition";
    case StatusCode::kAborted: return "Aborted";
    case StatusCode::kOutOfRange: return "OutOfRange";
    case StatusCode::kUnimplemented: return "Unimplemented";
    case StatusCode::kInternal: return "Internal";
    case StatusCode::kUnavailable: return "Unavailable";
    case StatusCode::kDataLoss: return "DataLoss";
  }
  return "Unknown";
}

Status::Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {
  if (code_ == StatusCode::kOk) message_.clear();
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string out(StatusCodeName(code_));
  out += ": ";
  out += message_;
  return out;
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return *this;
  std::string msg(context);
  msg += ": ";
  msg += message_;
  return Status(code_, std::move(msg));
}

#define KVAGENT_DEFINE_ERROR_(Name, Code) \
  Status Name(std::string message) { return Status(StatusCode::Code, std::move(message)); }
KVAGENT_DEFINE_ERROR_(CancelledError, kCancelled)
KVAGENT_DEFINE_ERROR_(UnknownError, kUnknown)
KVAGENT_DEFINE_ERROR_(InvalidArgumentError, kInvalidArgument)
KVAGENT_DEFINE_ERROR_(DeadlineExceededError, kDeadlineExceeded)
KVAGENT_DEFINE_ERROR_(NotFoundError, kNotFound)
KVAGENT_DEFINE_ERROR_(AlreadyExistsError, kAlreadyExists)
KVAGENT_DEFINE_ERROR_(PermissionDeniedError, kPermissionDenied)
KVAGENT_DEFINE_ERROR_(ResourceExhaustedError, kResourceExhausted)
KVAGENT_DEFINE_ERROR_(FailedPreconditionError, kFailedPrecondition)
KVAGENT_DEFINE_ERROR_(AbortedError, kAborted)
KVAGENT_DEFINE_ERROR_(OutOfRangeError, kOutOfRange)
KVAGENT_DEFINE_ERROR_(UnimplementedError, kUnimplemented)
KVAGENT_DEFINE_ERROR_(InternalError, kInternal)
KVAGENT_DEFINE_ERROR_(UnavailableError, kUnavailable)
KVAGENT_DEFINE_ERROR_(DataLossError, kDataLoss)
#undef KVAGENT_DEFINE_ERROR_

Status ErrnoToStatus(int err, std::string_view context) {
  std::string msg(context);
  msg += ": ";
  msg += std::strerror(err);
  switch (err) {
    case ENOENT: return NotFoundError(std::move(msg));
    case ENOSPC:
#ifdef EDQUOT
    case EDQUOT:
#endif
      return ResourceExhaustedError(std::move(msg));
    case EACCES:
    case EPERM: return PermissionDeniedError(std::move(msg));
    case EEXIST: return AlreadyExistsError(std::move(msg));
    case EINVAL: return InvalidArgumentError(std::move(msg));
    default: return InternalError(std::move(msg));
  }
}

}  // namespace kvagent
