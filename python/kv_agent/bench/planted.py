"""A generated planted-fact suite: can memory find one personal fact in everyday small talk?

Each episode is a conversation of ``EXCHANGES`` user/assistant exchanges. ``FACTS`` of them state
one personal fact each (a number, a name, a date, a place, a preference or a relation); the others
are distractors: two exchanges on the topic of each planted fact that share its topic words but
not the fact, one from each of two other topics, and generic small talk. Each fact has a question
that paraphrases it with as few shared content words as possible (measured: ``lexical_overlap``).
Everything comes from the templates below and a fixed seed, so ``generate()`` is reproducible and
the committed ``data/planted_v1.json`` is checked against it (golden test). Episodes alternate
between the ``tuning`` and ``report`` halves.

``kvagent bench planted`` stores every episode's exchanges in kv-memory (one session per
episode, through ``CacheManager.store_kv``) and asks each question through ``memory.retrieve``
restricted to its episode's session; a fact is found at top-1 / top-5 when its exchange is the
best hit / among the first five. BM25 and MiniLM rank the same exchanges' text.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from kv_agent.errors import InvalidArgumentError

SEED = 20261204
EPISODES = 48
FACTS = 5  # planted facts per episode
EXCHANGES = 20  # exchanges per episode
DATA_PATH = Path(__file__).resolve().parent / "data" / "planted_v1.json"
KINDS = ("number", "name", "date", "place", "preference", "relation")

_FIRST = ["Priya", "Tomasz", "Helena", "Kwame", "Ingrid", "Rafael", "Yuki", "Dmitri", "Amara", "Lucien", "Soraya",
          "Bjorn", "Mei", "Oskar", "Fatima", "Teodor"]
_DATES = ["June 14th", "the 3rd of August", "September 21st", "March 9th", "October 30th", "the 12th of May",
          "January 27th", "July 5th", "the 18th of November", "April 2nd"]

# Topic templates: kind, values, the fact exchange(s) ({v} = the value), paraphrased questions
# and distractor exchanges on the same topic without the fact.
TOPICS = [
    dict(topic="flat", kind="number", values=[str(n) for n in range(104, 990, 37)],
         fact=[("Guess what, we got the keys! Our flat on Maple Street is number {v}.",
                "Congratulations on the keys! Maple Street sounds lovely."),
               ("We moved into the flat on Maple Street at last, it's number {v}, third floor.",
                "Finally! Third floor means a good view, I hope.")],
         question=["Which unit does the user live in now?", "What is the door number of the user's new home?"],
         distractors=[("The flat has terrible water pressure, the shower barely works.",
                       "That sounds frustrating; maybe ask the landlord to check it."),
                      ("Our neighbours on Maple Street throw loud parties every Friday.",
                       "Earplugs might help until you can talk to them."),
                      ("I painted the kitchen of the flat a pale green this weekend.",
                       "Pale green sounds calming for a kitchen.")]),
    dict(topic="gym", kind="number", values=[str(n) for n in range(12, 240, 9)],
         fact=[("At the gym they gave me locker {v}, right next to the sauna.",
                "Handy spot, close to the sauna!"),
               ("My gym membership came with locker {v}, finally no more carrying my bag around.",
                "Nice, that makes the routine much easier.")],
         question=["What number was the user assigned for storing belongings at the fitness centre?",
                   "Which compartment does the user keep things in while working out?"],
         distractors=[("The gym was packed tonight, I waited ages for a bench.",
                       "Evenings are always busy; mornings might be quieter."),
                      ("The sauna at the gym is broken again.", "That's annoying after a hard session."),
                      ("I keep forgetting my towel at the gym.", "Maybe pack it the night before?")]),
    dict(topic="cousins", kind="number", values=[str(n) for n in range(7, 41)],
         fact=[("The family reunion was chaos, I have {v} cousins on my mother's side alone.",
                "Wow, that's a big family to keep track of!")],
         question=["How many children of the user's maternal aunts and uncles are there?"],
         distractors=[("The family reunion food was amazing, my aunt made three pies.", "Three pies, lucky you!"),
                      ("My mother's side always argues about politics at reunions.",
                       "Reunions can get heated, maybe steer towards safer topics."),
                      ("I lost touch with most cousins after school.", "It's never too late to reach out.")]),
    dict(topic="bus", kind="number", values=[str(n) for n in range(3, 120, 4)],
         fact=[("I take the number {v} bus to work every morning, it stops right by the bakery.",
                "Convenient, and you can grab a pastry on the way.")],
         question=["Which line does the user ride for the daily commute?"],
         distractors=[("The bus was late again this morning, I missed my first meeting.",
                       "Public transport can be so unreliable."),
                      ("The bakery near my stop sells amazing croissants.", "Now I'm hungry!"),
                      ("Work has been hectic every morning this week.", "Hang in there, the weekend is close.")]),
    dict(topic="puppy", kind="name", values=["Biscuit", "Pepper", "Waffles", "Captain", "Noodle", "Mochi", "Rusty",
                                             "Pickles", "Juniper", "Ziggy"],
         fact=[("We adopted a puppy last week and named him {v}.", "Aww, that's a great name for a puppy!"),
               ("Meet {v}, our new puppy! He arrived on Saturday.", "Congratulations on the new family member!")],
         question=["What is the user's new dog called?"],
         distractors=[("The puppy chewed through my charger cable last night.", "Puppies chew everything!"),
                      ("We're looking for a puppy training class nearby.", "Training early really pays off."),
                      ("Adopting a puppy was harder than I expected, so many vet visits.",
                       "The first months are the toughest.")]),
    dict(topic="manager", kind="name", values=_FIRST,
         fact=[("My new manager, {v}, seems pretty relaxed so far.", "That's a relief, a good manager helps a lot.")],
         question=["Who does the user report to at work?", "Who is the user's boss?"],
         distractors=[("My manager scheduled yet another meeting for Friday afternoon.", "Friday meetings are the worst."),
                      ("The new office seems pretty relaxed, people wear jeans.", "Sounds like a nice culture."),
                      ("I might ask my manager about working from home.", "It doesn't hurt to ask.")]),
    dict(topic="dentist", kind="name", values=["Okafor", "Lindqvist", "Moreau", "Tanaka", "Kowalski", "Esposito",
                                               "Haddad", "Novak", "Fischer", "Alvarez"],
         fact=[("My dentist, Dr. {v}, said I need to floss more.", "Good advice, even if nobody likes hearing it.")],
         question=["Which doctor looks after the user's teeth?"],
         distractors=[("The dentist's waiting room had the oldest magazines ever.", "Some things never change."),
                      ("I need to floss more, my gums bleed sometimes.", "Regular flossing usually fixes that."),
                      ("I'm scared of the dentist's drill.", "Lots of people are; you're not alone.")]),
    dict(topic="sailboat", kind="name", values=["Sea Breeze", "Marigold", "Albatross", "Blue Heron", "Wanderer",
                                                "Silver Gull", "Morning Star", "Little Wren"],
         fact=[("My grandfather's old sailboat is called the {v}.", "What a charming name for a boat.")],
         question=["What name is painted on the vessel that belonged to the user's granddad?"],
         distractors=[("My grandfather taught me to sail when I was ten.", "What a wonderful memory."),
                      ("The sailboat needs a new coat of paint before summer.", "A fun project for sunny days."),
                      ("Old boats are a lot of work to keep afloat.", "True, but they have character.")]),
    dict(topic="wedding", kind="date", values=_DATES,
         fact=[("My sister's wedding is on {v}, and I still haven't bought a suit.",
                "Better start shopping soon then!")],
         question=["When is the user's sibling getting married?"],
         distractors=[("My sister's wedding planner keeps changing the menu.", "Planners can be so indecisive."),
                      ("I still need to buy a suit for my friend's party.", "A good suit is always useful."),
                      ("Weddings make me cry every single time.", "That's sweet, honestly.")]),
    dict(topic="birthday", kind="date", values=_DATES,
         fact=[("My birthday is on {v}, I'm thinking of a small dinner.", "A small dinner sounds perfect.")],
         question=["On which day of the year was the user born?"],
         distractors=[("I'm thinking of a small dinner party this weekend.", "Lovely, who's coming?"),
                      ("My dad's birthday present arrived broken.", "Ugh, hopefully they'll replace it."),
                      ("Birthdays feel less exciting every year.", "Maybe try something new this time.")]),
    dict(topic="lisbon", kind="date", values=_DATES,
         fact=[("I finally booked the flight to Lisbon, I leave on {v}.", "Exciting, Lisbon is beautiful.")],
         question=["What is the departure date of the user's trip to Portugal?"],
         distractors=[("Flights to Lisbon are so expensive this year.", "Maybe try midweek dates."),
                      ("I booked a hotel with a rooftop pool.", "That sounds fantastic."),
                      ("I finally finished packing, it took all evening.", "The worst part is over!")]),
    dict(topic="thesis", kind="date", values=_DATES,
         fact=[("My thesis defence is scheduled for {v}, I'm so nervous.", "You'll do great, you know your work.")],
         question=["When does the user present the dissertation to the examining committee?"],
         distractors=[("My thesis advisor wants another chapter rewritten.", "Frustrating, but it'll be stronger."),
                      ("I'm nervous about public speaking in general.", "Practice really helps with that."),
                      ("The thesis printing costs are ridiculous.", "Maybe the library has cheaper options.")]),
    dict(topic="hometown", kind="place", values=["Tromso", "Ushuaia", "Hobart", "Galway", "Bergen", "Cusco", "Krakow",
                                                 "Matera", "Kotor", "Akureyri"],
         fact=[("I grew up in {v}, a small place nobody has heard of.", "I'd love to hear more about it someday.")],
         question=["Where did the user spend childhood?", "Which town was the user raised in?"],
         distractors=[("Small places have their charm, nobody locks their doors.", "That kind of trust is rare."),
                      ("I grew up loving snow and long winters.", "Winter people are a special kind."),
                      ("Nobody has heard of my favourite band either.", "Hidden gems are the best.")]),
    dict(topic="anniversary", kind="place", values=["Kyoto", "Marrakech", "Reykjavik", "Cape Town", "Hanoi",
                                                    "Valparaiso", "Tbilisi", "Oaxaca"],
         fact=[("For our anniversary we're going to {v} in the spring.", "What a romantic choice!")],
         question=["Which city will the couple visit to celebrate another year of marriage?"],
         distractors=[("Our anniversary dinner last year was a disaster, the restaurant lost our booking.",
                       "Oh no, at least it makes a good story now."),
                      ("Spring is the best time to travel, fewer crowds.", "And nicer weather too."),
                      ("We're going to repaint the living room in the spring.", "Have you picked a colour?")]),
    dict(topic="office", kind="place", values=["Rotterdam", "Leeds", "Lyon", "Graz", "Porto", "Tampere", "Gdansk",
                                               "Bilbao"],
         fact=[("Our team moved to a new office in {v} last month.", "A fresh start, how is it so far?")],
         question=["In which town is the user's workplace located now?"],
         distractors=[("The new office has a coffee machine that makes terrible espresso.", "Bring your own beans!"),
                      ("Our team moved desks three times this year.", "That sounds disruptive."),
                      ("Last month was the busiest of the year for our team.", "Hopefully it calms down now.")]),
    dict(topic="university", kind="place", values=["Edinburgh", "Padua", "Uppsala", "Leiden", "Coimbra", "Heidelberg",
                                                   "Salamanca", "Trinity College Dublin"],
         fact=[("I did my degree at the University of {v}, ages ago.", "That must have been a great place to study.")],
         question=["Which college did the user attend for higher education?"],
         distractors=[("My degree feels useless some days.", "Skills transfer more than you think."),
                      ("University friends are the ones I still see most.", "Those friendships last."),
                      ("Ages ago I wanted to be an architect.", "It's never too late to explore it.")]),
    dict(topic="gelato", kind="preference", values=["pistachio", "stracciatella", "mango", "hazelnut", "lemon",
                                                    "salted caramel", "fig", "black sesame"],
         fact=[("Honestly, {v} gelato beats every other flavour for me.", "Great taste, that's a classic.")],
         question=["Which frozen dessert does the user like most?"],
         distractors=[("The gelato place downtown closed for winter.", "Something to look forward to in spring."),
                      ("I tried a weird flavour yesterday, blue cheese and honey.", "Brave! Was it any good?"),
                      ("Honestly, summer beats every other season for me.", "Long evenings are hard to beat.")]),
    dict(topic="music", kind="preference", values=["Fleetwood Mac", "Radiohead", "ABBA", "Nina Simone", "Daft Punk",
                                                   "Bob Marley", "Bjork", "Miles Davis"],
         fact=[("I've had {v} on repeat all week, can't stop listening.", "Good choice, they never get old.")],
         question=["Which artist is the user obsessed with lately?"],
         distractors=[("I can't stop listening to podcasts on my commute.", "Any recommendations?"),
                      ("My headphones broke so no music all week.", "That's rough, silence is loud."),
                      ("The concert tickets sold out in minutes.", "Maybe resale prices will drop.")]),
    dict(topic="football", kind="preference", values=["Celtic", "Ajax", "Boca Juniors", "Benfica", "Napoli", "Galatasaray",
                                                      "Porto", "Dortmund"],
         fact=[("I'm a die-hard {v} fan, I never miss a match.", "Loyalty like that is rare!")],
         question=["Which club does the user support?"],
         distractors=[("I never miss a match at the pub when the weather's nice.", "Sounds like a good tradition."),
                      ("The match last night went to penalties, so stressful.", "Penalties are brutal."),
                      ("My nephew is a die-hard fan of video games.", "Kids these days!")]),
    dict(topic="coffee", kind="preference", values=["flat white", "cortado", "oat latte", "double espresso",
                                                    "chai latte", "matcha", "americano", "mocha"],
         fact=[("My go-to order is a {v}, every single morning.", "A good routine to start the day.")],
         question=["What does the user usually drink to wake up at the cafe?"],
         distractors=[("Every single morning the line is out the door.", "It must be good if it's that busy."),
                      ("I'm trying to cut down on sugar in the mornings.", "Small changes add up."),
                      ("My go-to lunch is a cheese sandwich.", "Simple and reliable.")]),
    dict(topic="cousin-colleague", kind="relation", values=_FIRST,
         fact=[("Funny thing: {v} from accounting is actually my cousin.", "Small world! Does everyone know?")],
         question=["Which coworker is part of the user's family?"],
         distractors=[("Accounting sent back my expense report for the third time.", "Bureaucracy at its finest."),
                      ("My cousin is visiting from Canada next month.", "That will be fun."),
                      ("Funny thing happened at lunch, the fire alarm went off.", "Hope it was just a drill!")]),
    dict(topic="neighbour-teacher", kind="relation", values=_FIRST,
         fact=[("Turns out my neighbour {v} used to be my chemistry teacher.", "What a coincidence!")],
         question=["Who taught the user science at school and now lives next door?"],
         distractors=[("My neighbour keeps parking in front of my garage.", "Maybe leave a friendly note."),
                      ("Chemistry was my worst subject in school.", "Same here, all those formulas."),
                      ("Turns out the bakery closes early on Sundays.", "Good to know.")]),
    dict(topic="best-friend", kind="relation", values=_FIRST,
         fact=[("{v} and I met in kindergarten, we've been best friends ever since.", "That's a lifelong friendship!")],
         question=["Who has been the user's closest pal since early childhood?"],
         distractors=[("Best friends are hard to find as an adult.", "True, it takes time."),
                      ("Kindergarten drop-off with my nephew was chaos today.", "Little ones and mornings!"),
                      ("We met the new neighbours yesterday, they seem nice.", "Good neighbours are gold.")]),
    dict(topic="uncle-bikes", kind="relation", values=_FIRST,
         fact=[("My uncle {v} is the one who taught me to fix bikes.", "A very practical skill to learn.")],
         question=["Which relative showed the user how to repair bicycles?"],
         distractors=[("My bike has a flat tyre again.", "Time for puncture-proof tyres."),
                      ("My uncle is visiting for the holidays.", "Family time, nice."),
                      ("I taught myself to bake bread during the winter.", "Homemade bread is the best.")]),
]

SMALL_TALK = [
    ("The weather has been so grey lately.", "A bit of sun would help everyone's mood."),
    ("Any plans for the weekend?", "Maybe a walk if it doesn't rain. You?"),
    ("I watched a documentary about octopuses last night.", "They're fascinating creatures."),
    ("Traffic was awful on the way home.", "Rush hour is the worst."),
    ("I made soup from whatever was left in the fridge.", "Those often turn out the best."),
    ("I'm trying to read more before bed instead of scrolling.", "Good habit, any book in mind?"),
    ("My plants are finally growing new leaves.", "Spring is doing its thing."),
    ("I can't decide what to cook tonight.", "Pasta is always a safe bet."),
    ("The power went out for an hour this afternoon.", "Hope nothing in the freezer melted."),
    ("I started learning to knit, it's harder than it looks.", "The first scarf is always lumpy."),
    ("Do you think it'll snow this year?", "Hard to say, winters are unpredictable now."),
    ("I slept terribly last night.", "Maybe an early night today?"),
    ("I found an old photo album in the attic.", "Those are little treasures."),
    ("The new season of that detective show is out.", "No spoilers please!"),
    ("I walked ten thousand steps today.", "Well done, that's a good goal."),
    ("My phone battery dies so fast these days.", "Might be time for a new battery."),
    ("I tried a new recipe with lentils.", "Lentils are so versatile."),
    ("The neighbourhood cat visited my balcony again.", "It seems to like you."),
    ("I'm thinking about taking a pottery class.", "That sounds relaxing."),
    ("It's been a long week.", "You deserve a quiet evening."),
]

STOPWORDS = set("""a an the and or but of to in on at for with from by is are was were be been being i me my we our
you your he him his she her it its they them their this that these those what which who whom when where why how
does do did has have had will would can could should not no yes so as if than then there here about into over
after before up down out off again just very too also any all each some most more other such only own same now
user users s t""".split())  # noqa: SIM905 - a word list reads better as text


def content_words(text: str) -> set[str]:
    """Lowercase word stems (a plural/possessive ``s`` dropped) that are not stop words."""
    words = re.findall(r"[a-z]+", text.lower())
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words if w not in STOPWORDS}


def lexical_overlap(question: str, text: str) -> float:
    """Share of the question's content words that also occur in ``text`` (0 when it has none)."""
    q = content_words(question)
    return len(q & content_words(text)) / len(q) if q else 0.0


def generate(seed: int = SEED, episodes: int = EPISODES) -> dict:
    """The suite, deterministic in ``seed``: {"seed", "episodes": [{id, split, exchanges, facts}]}."""
    if episodes < 1:
        raise InvalidArgumentError("episodes must be >= 1")
    rng = random.Random(seed)
    by_kind = {k: [t for t in TOPICS if t["kind"] == k] for k in KINDS}
    out = []
    for e in range(episodes):
        kinds = rng.sample(KINDS, FACTS)  # five different kinds per episode
        topics = [rng.choice(by_kind[k]) for k in kinds]
        others = rng.sample([t for t in TOPICS if t not in topics], 2)
        items = []  # (prompt, response, fact index or None)
        facts = []
        for fi, t in enumerate(topics):
            v = rng.choice([x for x in t["values"] if x not in {f["answer"] for f in facts}])  # one answer, one place
            p, r = rng.choice(t["fact"])
            items.append((p.format(v=v), r.format(v=v), fi))
            facts.append({"kind": t["kind"], "topic": t["topic"], "answer": v, "question": rng.choice(t["question"])})
            items += [(p2, r2, None) for p2, r2 in rng.sample(t["distractors"], 2)]
        items += [(*rng.choice(t["distractors"]), None) for t in others]
        items += [(p, r, None) for p, r in rng.sample(SMALL_TALK, EXCHANGES - len(items))]
        rng.shuffle(items)
        exchanges = []
        for j, (p, r, fi) in enumerate(items):
            exchanges.append({"user": p, "assistant": r})
            if fi is not None:
                facts[fi]["exchange"] = j
        for fi, f in enumerate(facts):
            f["id"] = f"ep{e:02d}/f{fi}"
        out.append({"id": f"ep{e:02d}", "split": "tuning" if e % 2 == 0 else "report", "exchanges": exchanges,
                    "facts": facts})
    return {"seed": seed, "version": 1, "episodes": out}


def load_suite(path: str | Path | None = None) -> dict:
    p = Path(path) if path is not None else DATA_PATH
    if not p.is_file():
        raise InvalidArgumentError(f"planted-fact suite not found at {p}")
    return json.loads(p.read_text())


def exchange_text(x: dict) -> str:
    return f"{x['user']} {x['assistant']}"


def overlap_stats(suite: dict) -> dict:
    """Lexical overlap of each question with its fact exchange and with the closest other exchange."""
    fact_o, best_other = [], []
    for ep in suite["episodes"]:
        for f in ep["facts"]:
            fact_o.append(lexical_overlap(f["question"], exchange_text(ep["exchanges"][f["exchange"]])))
            best_other.append(max(lexical_overlap(f["question"], exchange_text(x))
                                  for j, x in enumerate(ep["exchanges"]) if j != f["exchange"]))
    n = len(fact_o)
    return {"facts": n, "question_fact_overlap_mean": sum(fact_o) / n,
            "question_fact_overlap_zero": sum(o == 0 for o in fact_o) / n,
            "question_best_distractor_overlap_mean": sum(best_other) / n,
            "distractor_overlap_ge_fact": sum(b >= o for b, o in zip(best_other, fact_o, strict=True)) / n}


# ------------------------------------------------------------------ benchmark
@dataclass
class PlantedConfig:
    suite: str | None = None  # path of the suite JSON (default: the committed one)
    split: str = "tuning"  # tuning, report or all
    systems: list[str] = field(default_factory=lambda: ["rag-bm25", "rag-minilm", "kv-memory"])
    cache_dir: str | None = None
    out: str = "bench/out/planted"
    model: str | None = None
    episodes: int = 0  # first N episodes of the split (0 = all)


PLANTED_SYSTEMS = ("rag-bm25", "rag-minilm", "kv-memory")


def _suite_key(fingerprint_hex: str, episodes: list[dict]) -> str:
    h = hashlib.sha256(json.dumps({"model": fingerprint_hex, "episodes": episodes, "format": 1},
                                  sort_keys=True).encode())
    return f"planted-{h.hexdigest()[:16]}"


def run_planted(cfg: PlantedConfig, progress: bool = True, model_and_tokenizer=None) -> dict:
    """Top-1/top-5 hit rates of every system on the chosen split of the suite."""
    from tqdm.auto import tqdm

    from kv_agent.bench.report import git_commit, machine_info

    bad = [s for s in cfg.systems if s not in PLANTED_SYSTEMS]
    if bad or not cfg.systems:
        raise InvalidArgumentError(f"unknown systems {bad}; choose from {list(PLANTED_SYSTEMS)}")
    if cfg.split not in ("tuning", "report", "all"):
        raise InvalidArgumentError(f"unknown split {cfg.split!r}; choose tuning, report or all")
    if cfg.episodes < 0:
        raise InvalidArgumentError("episodes must be >= 0")
    suite = load_suite(cfg.suite)
    eps = [e for e in suite["episodes"] if cfg.split == "all" or e["split"] == cfg.split]
    if cfg.episodes:
        eps = eps[: cfg.episodes]
    t_start = time.perf_counter()
    rows: list[dict] = []
    timing: dict = {}
    for kind in ("bm25", "minilm"):
        if f"rag-{kind}" not in cfg.systems:
            continue
        from kv_agent.bench.retrievers import make_retriever

        t0 = time.perf_counter()
        for ep in eps:
            r = make_retriever(kind, [exchange_text(x) for x in ep["exchanges"]])
            for f in ep["facts"]:
                ranked = [i for i, _ in r.search(f["question"], 5)]
                rows.append(_row(f"rag-{kind}", ep, f, ranked))
        timing[f"rag-{kind}_s"] = time.perf_counter() - t0
    if "kv-memory" in cfg.systems:
        rows += _kv_rows(cfg, eps, timing, progress, model_and_tokenizer, tqdm)
    doc = {"config": cfg.__dict__, "machine": machine_info(), "git_commit": git_commit(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "suite": {"seed": suite["seed"], "version": suite["version"],
                                                                   "episodes": len(eps)},
           "overlap": overlap_stats({"episodes": eps}), "aggregates": _aggregate(rows), "timing": timing,
           "wall_s": time.perf_counter() - t_start, "records": rows}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "planted.json").write_text(json.dumps(doc, indent=1))
    (out / "planted.md").write_text(planted_markdown(doc))
    return doc


def _row(system: str, ep: dict, f: dict, ranked: list[int]) -> dict:
    return {"system": system, "fact": f["id"], "kind": f["kind"], "split": ep["split"], "target": f["exchange"],
            "ranked": ranked[:5], "top1": bool(ranked[:1] == [f["exchange"]]), "top5": f["exchange"] in ranked[:5]}


def _kv_rows(cfg, eps, timing, progress, model_and_tokenizer, tqdm) -> list[dict]:
    import shutil
    import tempfile

    from kv_agent.api import AgentMemory, CacheManager
    from kv_agent.engines.hf import HFEngine
    from kv_agent.models import load_default_model, load_model

    if model_and_tokenizer is not None:
        model, tok = model_and_tokenizer
    else:
        model, tok = load_model(cfg.model) if cfg.model else load_default_model()
    engine = HFEngine(model, tok)
    temporary = cfg.cache_dir is None
    path = Path(tempfile.mkdtemp(prefix="kvagent-planted-")) if temporary else \
        Path(cfg.cache_dir) / _suite_key(engine.weights_fingerprint().hex(), eps)
    marker = path / "complete.json"
    cached = marker.is_file()
    if path.exists() and not cached:
        shutil.rmtree(path)
    t0 = time.perf_counter()
    memory = AgentMemory(path, backend="cpu", namespace="planted")
    rows = []
    try:
        cm = CacheManager(model=engine, memory=memory, session="planted")
        if not cached:
            for ep in tqdm(eps, desc="planted: store exchanges", disable=not progress):
                for j, x in enumerate(ep["exchanges"]):
                    cm.store_kv(x["user"], x["assistant"], session=ep["id"], turn=j + 1)
            memory.flush()
            if not temporary:
                marker.write_text(json.dumps({"episodes": len(eps), "ingest_s": time.perf_counter() - t0}))
        timing["kv-memory_store_s" if not cached else "kv-memory_open_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        for ep in tqdm(eps, desc="planted: retrieve", disable=not progress):
            for f in ep["facts"]:
                hits = sorted(memory.retrieve(f["question"], top_k=5, session=ep["id"]), key=lambda h: h.rank)
                rows.append(_row("kv-memory", ep, f, [h.turn - 1 for h in hits]))
        timing["kv-memory_retrieve_s"] = time.perf_counter() - t1
    finally:
        memory.close()
        if temporary:
            shutil.rmtree(path, ignore_errors=True)
    return rows


def _aggregate(rows: list[dict]) -> dict:
    out: dict = {}
    for split in sorted({r["split"] for r in rows}):
        out[split] = {}
        for system in dict.fromkeys(r["system"] for r in rows):
            rs = [r for r in rows if r["split"] == split and r["system"] == system]
            if not rs:
                continue
            a = {"facts": len(rs), "top1": sum(r["top1"] for r in rs) / len(rs), "top5": sum(r["top5"] for r in rs) / len(rs)}
            a["top5_by_kind"] = {k: sum(r["top5"] for r in rs if r["kind"] == k) / n
                                 for k in KINDS if (n := sum(r["kind"] == k for r in rs))}
            out[split][system] = a
    return out


def planted_markdown(doc: dict) -> str:
    o = doc["overlap"]
    lines = [f"Planted-fact suite v{doc['suite']['version']} (seed {doc['suite']['seed']}), {o['facts']} facts in "
             f"{doc['suite']['episodes']} episodes of {EXCHANGES} exchanges. Lexical overlap (share of the question's "
             f"content words found in the text): with the fact exchange {100 * o['question_fact_overlap_mean']:.1f}% "
             f"({100 * o['question_fact_overlap_zero']:.0f}% of questions share none), with the closest other "
             f"exchange {100 * o['question_best_distractor_overlap_mean']:.1f}%.", ""]
    for split, systems in doc["aggregates"].items():
        lines += [f"| split `{split}` | facts | top-1 | top-5 | " + " | ".join(f"top-5 {k}" for k in KINDS) + " |",
                  "|---|---|---|---|" + "---|" * len(KINDS)]
        for name, a in systems.items():
            kinds = " | ".join(f"{100 * a['top5_by_kind'][k]:.0f}" if k in a["top5_by_kind"] else "-" for k in KINDS)
            lines.append(f"| {name} | {a['facts']} | {100 * a['top1']:.1f} | {100 * a['top5']:.1f} | {kinds} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:  # regenerates the committed data file
    DATA_PATH.parent.mkdir(parents=True, exist_ok=True)
    DATA_PATH.write_text(json.dumps(generate(), indent=1) + "\n")


if __name__ == "__main__":
    main()
