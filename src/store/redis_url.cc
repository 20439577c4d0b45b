#include <cctype>
#include <cstdlib>
#include <string>

#include "kvagent/remote_options.h"

namespace kvagent {

namespace {

Status BadUrl(std::string_view why) {
  // The URL itself is not echoed: it may hold a password.
  return InvalidArgumentError("bad Redis URL (expected redis://[user:password@]host[:port][/db]): " + std::string(why));
}

StatusOr<std::string> PercentDecode(std::string_view in) {
  std::string out;
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '%') {
      out.push_back(in[i]);
      continue;
    }
    if (i + 2 >= in.size() || !std::isxdigit(static_cast<unsigned char>(in[i + 1])) ||
        !std::isxdigit(static_cast<unsigned char>(in[i + 2])))
      return BadUrl("bad percent escape in the credentials");
    out.push_back(static_cast<char>(std::stoi(std::string(in.substr(i + 1, 2)), nullptr, 16)));
    i += 2;
  }
  return out;
}

// A decimal integer in [lo, hi], all of `s`.
bool ParseInt(std::string_view s, int lo, int hi, int* out) {
  if (s.empty() || s.size() > 9) return false;
  int v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + (c - '0');
  }
  if (v < lo || v > hi) return false;
  *out = v;
  return true;
}

}  // namespace

StatusOr<RedisUrl> RedisUrl::Parse(std::string_view url) {
  RedisUrl u;
  constexpr std::string_view kScheme = "redis://";
  if (url.starts_with("rediss://"))
    return InvalidArgumentError("rediss:// (TLS) is not supported by this build (Debian hiredis without TLS)");
  if (!url.starts_with(kScheme)) return BadUrl("scheme must be redis://");
  std::string_view rest = url.substr(kScheme.size());
  // The authority ends at the first '/' (a '/' or '@' in a password must be percent-encoded).
  std::string_view authority = rest.substr(0, rest.find('/'));
  const size_t at = authority.rfind('@');
  if (at != std::string_view::npos) {
    std::string_view cred = authority.substr(0, at);
    rest = rest.substr(at + 1);
    const size_t colon = cred.find(':');
    if (colon == std::string_view::npos) {
      // redis://password@host, as redis-cli -u accepts.
      KVAGENT_ASSIGN_OR_RETURN(u.password, PercentDecode(cred));
    } else {
      KVAGENT_ASSIGN_OR_RETURN(u.user, PercentDecode(cred.substr(0, colon)));
      KVAGENT_ASSIGN_OR_RETURN(u.password, PercentDecode(cred.substr(colon + 1)));
    }
  }
  std::string_view hostport = rest.substr(0, rest.find('/'));
  if (rest.size() > hostport.size()) {
    std::string_view db = rest.substr(hostport.size() + 1);
    if (!db.empty() && !ParseInt(db, 0, 1 << 20, &u.db)) return BadUrl("db must be a number");
  }
  std::string_view port;
  if (hostport.starts_with('[')) {
    const size_t close = hostport.find(']');
    if (close == std::string_view::npos) return BadUrl("unterminated [IPv6] host");
    u.host = std::string(hostport.substr(1, close - 1));
    std::string_view after = hostport.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') return BadUrl("junk after [IPv6] host");
      port = after.substr(1);
      if (port.empty()) return BadUrl("empty port");
    }
  } else {
    const size_t colon = hostport.find(':');
    u.host = std::string(hostport.substr(0, colon));
    if (colon != std::string_view::npos) {
      port = hostport.substr(colon + 1);
      if (port.empty()) return BadUrl("empty port");
    }
  }
  if (u.host.empty()) return BadUrl("missing host");
  if (!port.empty() && !ParseInt(port, 1, 65535, &u.port)) return BadUrl("port must be 1-65535");
  if (u.user.empty() && u.password.empty()) {
    if (const char* user = std::getenv("KVAGENT_REDIS_USER")) u.user = user;
    if (const char* pass = std::getenv("KVAGENT_REDIS_PASSWORD")) u.password = pass;
  }
  return u;
}

std::string RedisUrl::Redacted() const {
  std::string out = "redis://";
  if (!user.empty()) out += user + (password.empty() ? "@" : ":***@");
  else if (!password.empty()) out += "***@";
  out += host.find(':') != std::string::npos ? "[" + host + "]" : host;
  out += ":" + std::to_string(port) + "/" + std::to_string(db);
  return out;
}

}  // namespace kvagent
