#include "kvagent/planner.h"

#include <algorithm>
#include <numeric>

namespace kvagent {

namespace {

Status CheckInputs(const std::vector<PlanInput>& v, const char* what) {
  for (const PlanInput& p : v) {
    if (p.num_tokens <= 0) return InvalidArgumentError(std::string(what) + " segment with " + std::to_string(p.num_tokens) + " tokens");
  }
  return Status::Ok();
}

int64_t Sum(const std::vector<PlanInput>& v) {
  return std::accumulate(v.begin(), v.end(), int64_t{0}, [](int64_t a, const PlanInput& p) { return a + p.num_tokens; });
}

std::vector<PlanInput> SortedByOrder(std::vector<PlanInput> v) {
  std::stable_sort(v.begin(), v.end(), [](const PlanInput& a, const PlanInput& b) { return a.order < b.order; });
  return v;
}

}  // namespace

StatusOr<Plan> MakePlan(const std::vector<PlanInput>& prefix, const std::vector<PlanInput>& retrieved,
                        const std::vector<PlanInput>& recent, int new_tokens, const PlanOptions& options) {
  if (new_tokens < 0) return InvalidArgumentError("new_tokens must be >= 0");
  if (options.page_size < 1) return InvalidArgumentError("page_size must be >= 1");
  if (options.sink_repair_tokens < 0) return InvalidArgumentError("sink_repair_tokens must be >= 0");
  if (options.max_context < 0) return InvalidArgumentError("max_context must be >= 0");
  KVAGENT_RETURN_IF_ERROR(CheckInputs(prefix, "prefix"));
  KVAGENT_RETURN_IF_ERROR(CheckInputs(retrieved, "retrieved"));
  KVAGENT_RETURN_IF_ERROR(CheckInputs(recent, "recent"));

  Plan plan;
  std::vector<PlanInput> kept = retrieved;
  if (options.max_context > 0) {
    int64_t fixed = Sum(prefix) + Sum(recent) + new_tokens;
    if (fixed > options.max_context)
      return ResourceExhaustedError("prefix + recent turns + new tokens need " + std::to_string(fixed) +
                                    " positions, max_context is " + std::to_string(options.max_context));
    // Drop the lowest-scored retrieved segments until the rest fits (ties: drop the later one).
    std::vector<size_t> by_score(kept.size());
    std::iota(by_score.begin(), by_score.end(), 0);
    std::stable_sort(by_score.begin(), by_score.end(), [&](size_t a, size_t b) { return kept[a].score > kept[b].score; });
    int64_t used = fixed;
    std::vector<bool> keep(kept.size(), false);
    for (size_t i : by_score) {
      if (used + kept[i].num_tokens <= options.max_context) {
        keep[i] = true;
        used += kept[i].num_tokens;
      } else {
        plan.dropped.push_back(kept[i].key);
      }
    }
    std::vector<PlanInput> filtered;
    for (size_t i = 0; i < kept.size(); ++i)
      if (keep[i]) filtered.push_back(kept[i]);
    kept = std::move(filtered);
  }

  int64_t position = 0;
  int64_t slot = 0;
  const int64_t page = options.page_size;
  auto place = [&](const PlanInput& in, PlanPart part) {
    PlannedSegment s;
    s.key = in.key;
    s.part = part;
    s.num_tokens = in.num_tokens;
    s.score = in.score;
    s.position = position;
    s.slot = (slot + page - 1) / page * page;
    s.recompute_tokens = part == PlanPart::kRetrieved ? std::min(options.sink_repair_tokens, in.num_tokens) : 0;
    position += in.num_tokens;
    slot = s.slot + in.num_tokens;
    plan.reused_tokens += in.num_tokens - s.recompute_tokens;
    plan.recomputed_tokens += s.recompute_tokens;
    plan.segments.push_back(s);
  };
  for (const PlanInput& p : prefix) place(p, PlanPart::kPrefix);
  for (const PlanInput& p : SortedByOrder(kept)) place(p, PlanPart::kRetrieved);
  for (const PlanInput& p : SortedByOrder(recent)) place(p, PlanPart::kRecent);

  plan.new_tokens = new_tokens;
  plan.new_tokens_position = position;
  plan.new_tokens_slot = (slot + page - 1) / page * page;
  plan.total_positions = position + new_tokens;
  plan.total_slots = plan.new_tokens_slot + new_tokens;
  plan.recomputed_tokens += new_tokens;
  return plan;
}

}  // namespace kvagent
