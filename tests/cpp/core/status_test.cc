#include "kvagent/status.h"

#include <gtest/gtest.h>

#include <cerrno>

namespace kvagent {
namespace {

StatusOr<int> Half(int x) {
  if (x % 2 != 0) return InvalidArgumentError("odd");
  return x / 2;
}

Status UseHalf(int x, int* out) {
  KVAGENT_ASSIGN_OR_RETURN(*out, Half(x));
  return Status::Ok();
}

TEST(Status, CodesAndMessages) {
  Status ok;
  EXPECT_TRUE(ok.ok());
  EXPECT_EQ(ok.ToString(), "OK");
  Status e = NotFoundError("segment abc");
  EXPECT_FALSE(e.ok());
  EXPECT_EQ(e.code(), StatusCode::kNotFound);
  EXPECT_EQ(e.ToString(), "NotFound: segment abc");
  EXPECT_EQ(e.WithContext("Get").message(), "Get: segment abc");
  EXPECT_EQ(StatusCodeName(StatusCode::kDataLoss), "DataLoss");
}

TEST(Status, StatusOrAndMacros) {
  int out = 0;
  EXPECT_TRUE(UseHalf(8, &out).ok());
  EXPECT_EQ(out, 4);
  Status s = UseHalf(3, &out);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(out, 4);
}

TEST(Status, Errno) {
  EXPECT_EQ(ErrnoToStatus(ENOSPC, "write").code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(ErrnoToStatus(ENOENT, "open").code(), StatusCode::kNotFound);
  EXPECT_EQ(ErrnoToStatus(EIO, "read").code(), StatusCode::kInternal);
}

}  // namespace
}  // namespace kvagent
