import json

import pytest

pytest.importorskip("nltk")  # the LoCoMo scoring rules stem with nltk (absent on the GPU image)
from kv_agent.bench import locomo, scoring


def test_normalize_and_f1():
    assert scoring.normalize_answer("The Cat, and a DOG!") == "cat dog"
    assert scoring.f1_score("running dogs", "the dog runs") == pytest.approx(1.0)
    assert scoring.f1_score("cat", "dog") == 0.0
    # precision 1/2, recall 1 -> 2/3
    assert scoring.f1_score("blue car", "car") == pytest.approx(2 / 3)


def test_category_rules():
    assert scoring.score_answer("Paris, London", "London, Paris", 1) == pytest.approx(1.0)
    assert scoring.score_answer("Paris", "London, Paris", 1) == pytest.approx(0.5)
    assert scoring.score_answer("psychology", "psychology; counseling", 3) == pytest.approx(1.0)
    assert scoring.score_answer("That is not mentioned in the conversation.", "x", 5) == 1.0
    assert scoring.score_answer("She went to Paris", "x", 5) == 0.0
    assert scoring.score_answer("7 May 2023", "7 May 2023", 2) == pytest.approx(1.0)


def test_recall():
    r = scoring.recall_at(["D1:3", "D2:1"], ["D1:3", "D4:4"])
    assert r == {"recall": 0.5, "recall_any": 1.0, "recall_all": 0.0}
    assert scoring.recall_at(["D1:1"], []) is None


def test_evidence_normalisation():
    assert locomo.normalize_evidence(["D:11:26"]) == ["D11:26"]
    assert locomo.normalize_evidence(["D30:05"]) == ["D30:5"]
    assert locomo.normalize_evidence("D1:2; D1:3,D2:4 D2:4") == ["D1:2", "D1:3", "D2:4"]
    assert locomo.normalize_evidence(None) == []


def test_load_small_file(tmp_path):
    rec = {
        "sample_id": "conv-x",
        "conversation": {
            "speaker_a": "A",
            "speaker_b": "B",
            "session_1_date_time": "1:00 pm on 1 May, 2023",
            "session_1": [
                {"speaker": "A", "dia_id": "D1:1", "text": "Hi"},
                {"speaker": "B", "dia_id": "D1:2", "text": "Look", "img_url": ["u"], "blip_caption": "a dog"},
            ],
        },
        "qa": [
            {"question": "q1", "answer": 2022, "evidence": ["D1:2", "D9:9"], "category": 2},
            {"question": "q2", "adversarial_answer": "no", "evidence": [], "category": 5},
        ],
    }
    p = tmp_path / "l.json"
    p.write_text(json.dumps([rec]))
    (conv,) = locomo.load_locomo(p)
    assert [t.dia_id for t in conv.turns] == ["D1:1", "D1:2"]
    assert "a dog" in conv.turns[1].text
    assert conv.questions[0].answer == "2022"
    assert conv.questions[0].evidence == ("D1:2",)  # D9:9 points to no turn: dropped
    assert conv.questions[1].answer == "no"


@pytest.mark.skipif(not locomo.DEFAULT_LOCOMO_PATH.exists(), reason="shared LoCoMo data not present")
def test_load_dev_split_counts():
    convs = locomo.load_locomo()
    assert len(convs) == 7
    cats = {}
    for c in convs:
        for q in c.questions:
            cats[q.category] = cats.get(q.category, 0) + 1
    assert cats == {1: 192, 2: 214, 3: 66, 4: 563, 5: 312}


def test_truncate_sessions_keeps_answerable_questions():
    from kv_agent.bench.locomo_bench import truncate_sessions

    conv = locomo.Conversation("c", "A", "B", {1: "d1", 2: "d2"},
                               [locomo.Turn("D1:1", 1, 1, "A", "x", "d1"), locomo.Turn("D2:1", 2, 1, "B", "y", "d2")],
                               [locomo.Question("c/q0", "q", "a", 4, ("D1:1",)),
                                locomo.Question("c/q1", "q", "a", 4, ("D1:1", "D2:1")),
                                locomo.Question("c/q2", "q", "a", 5, ())])
    t = truncate_sessions(conv, 1)
    assert [x.dia_id for x in t.turns] == ["D1:1"]
    assert [q.qid for q in t.questions] == ["c/q0"]
    assert truncate_sessions(conv, 0) is conv
