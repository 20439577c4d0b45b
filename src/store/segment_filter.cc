#include "kvagent/store_types.h"

namespace kvagent {

bool SegmentFilter::Matches(const SegmentInfo& info) const {
  if (model && *model != info.model) return false;
  if (!ns.empty() && ns != info.meta.ns) return false;
  if (!agent.empty() && agent != info.meta.agent) return false;
  if (!session.empty() && session != info.meta.session) return false;
  return info.meta.time_us >= min_time_us && info.meta.time_us <= max_time_us;
}

}  // namespace kvagent
