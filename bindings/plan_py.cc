// Planner bindings: kv_agent._core.make_plan.
#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "errors.h"
#include "kvagent/planner.h"
#include "registry.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kvagent::py {
namespace {

void RegisterPlan(nb::module_& m) {
  nb::enum_<PlanPart>(m, "PlanPart")
      .value("prefix", PlanPart::kPrefix)
      .value("retrieved", PlanPart::kRetrieved)
      .value("recent", PlanPart::kRecent);

  nb::class_<PlanInput>(m, "PlanInput")
      .def(nb::init<>())
      .def("__init__",
           [](PlanInput* p, const Hash128& key, int num_tokens, double score, int64_t order) {
             new (p) PlanInput{key, num_tokens, score, order};
           },
           "key"_a, "num_tokens"_a, "score"_a = 0.0, "order"_a = 0)
      .def_rw("key", &PlanInput::key)
      .def_rw("num_tokens", &PlanInput::num_tokens)
      .def_rw("score", &PlanInput::score)
      .def_rw("order", &PlanInput::order);

  nb::class_<PlanOptions>(m, "PlanOptions")
      .def(nb::init<>())
      .def_rw("sink_repair_tokens", &PlanOptions::sink_repair_tokens)
      .def_rw("page_size", &PlanOptions::page_size)
      .def_rw("max_context", &PlanOptions::max_context);

  nb::class_<PlannedSegment>(m, "PlannedSegment")
      .def_ro("key", &PlannedSegment::key)
      .def_ro("part", &PlannedSegment::part)
      .def_ro("num_tokens", &PlannedSegment::num_tokens)
      .def_ro("position", &PlannedSegment::position)
      .def_ro("slot", &PlannedSegment::slot)
      .def_ro("recompute_tokens", &PlannedSegment::recompute_tokens)
      .def_ro("score", &PlannedSegment::score);

  nb::class_<Plan>(m, "Plan")
      .def_ro("segments", &Plan::segments)
      .def_ro("new_tokens_position", &Plan::new_tokens_position)
      .def_ro("new_tokens_slot", &Plan::new_tokens_slot)
      .def_ro("new_tokens", &Plan::new_tokens)
      .def_ro("total_positions", &Plan::total_positions)
      .def_ro("total_slots", &Plan::total_slots)
      .def_ro("reused_tokens", &Plan::reused_tokens)
      .def_ro("recomputed_tokens", &Plan::recomputed_tokens)
      .def_ro("dropped", &Plan::dropped);

  m.def("make_plan",
        [](const std::vector<PlanInput>& prefix, const std::vector<PlanInput>& retrieved,
           const std::vector<PlanInput>& recent, int new_tokens, const PlanOptions& options) {
          return ValueOrThrow(MakePlan(prefix, retrieved, recent, new_tokens, options));
        },
        "prefix"_a, "retrieved"_a, "recent"_a, "new_tokens"_a, "options"_a = PlanOptions(),
        "Lays out [prefix][retrieved (original order)][recent][new tokens] with contiguous positions.");
}

Registration reg("plan", 10, &RegisterPlan);

}  // namespace
}  // namespace kvagent::py
