"""A small synthetic world: the demo model's training text and its evaluation tasks both come from here.

Forty made-up people with a city, a favourite colour, a pet and a job; small-number arithmetic; daily routines
that follow from a job. Documents are written in exactly the formats lm-eval uses for the task shapes the demo
suite evaluates (boolq, arc_easy, hellaswag, wikitext, short-answer generation), so a ~1M-parameter model
trained for a few minutes on CPU scores clearly above chance on them.

Memorised facts (arc-, qa-shaped) are questions about the world, as in real benchmarks; boolq-shaped items are
about *new* names in a passage, so they test reading the context, not memory. Everything is a pure function of
its seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

CITIES = ["Pellam", "Varno", "Quist", "Dorrin", "Alvash", "Tembry", "Morrow", "Kesh"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
PETS = ["cat", "dog", "fox", "owl", "frog", "goat", "horse", "fish"]
JOBS = ["baker", "farmer", "teacher", "doctor", "painter", "sailor", "miner", "singer"]
# What each job does every morning: the hellaswag-shaped task picks the ending that fits the job.
ROUTINES = {
    "baker": ["bakes fresh bread for the town", "mixes flour and water in a bowl", "sells warm rolls at the shop"],
    "farmer": ["feeds the cows in the barn", "plants seeds in the field", "drives the tractor to the hill"],
    "teacher": ["reads a story to the class", "writes sums on the board", "marks the homework of the pupils"],
    "doctor": ["visits the sick in the hospital", "listens to the heart of a patient", "gives medicine to a child"],
    "painter": ["paints a picture of the sea", "mixes colors on a board", "cleans the brushes with soap"],
    "sailor": ["raises the sails of the boat", "ties ropes on the deck", "steers the ship out of the harbor"],
    "miner": ["digs for coal under the ground", "lights a lamp in the tunnel", "pushes a cart full of stones"],
    "singer": ["sings a song for the crowd", "practices notes at the piano", "warms up her voice on the stage"],
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "n", "r", "l", "k", "s"]


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    color: str
    pet: str
    job: str


def make_name(rng: random.Random) -> str:
    syllables = rng.choice([2, 2, 3])
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    return word.capitalize()


def people(seed: int = 7, count: int = 40) -> list[Person]:
    """The world's residents: fixed by the seed, so training and evaluation agree on every fact."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < count:
        name = make_name(rng)
        if name not in names:
            names.append(name)
    return [Person(n, rng.choice(CITIES), rng.choice(COLORS), rng.choice(PETS), rng.choice(JOBS)) for n in names]


WORLD = people()
_WORLD_NAMES = {p.name for p in WORLD}


def stranger(rng: random.Random) -> Person:
    """A person who is not in the world: facts about them can only come from the passage."""
    while True:
        name = make_name(rng)
        if name not in _WORLD_NAMES:
            return Person(name, rng.choice(CITIES), rng.choice(COLORS), rng.choice(PETS), rng.choice(JOBS))


# --- sentences ----------------------------------------------------------------------------------------------
FACT = {
    "city": "{p.name} lives in {p.city}.",
    "color": "{p.name} likes the color {p.color}.",
    "pet": "{p.name} has a {p.pet}.",
    "job": "{p.name} works as a {p.job}.",
}
YES_NO_QUESTION = {
    "city": "does {name} live in {value}",
    "color": "does {name} like the color {value}",
    "pet": "does {name} have a {value}",
    "job": "does {name} work as a {value}",
}
WH_QUESTION = {
    "city": "Where does {p.name} live?",
    "color": "What color does {p.name} like?",
    "pet": "What pet does {p.name} have?",
    "job": "What is the job of {p.name}?",
}
CHOICES = {"city": CITIES, "color": COLORS, "pet": PETS, "job": JOBS}


def arithmetic(rng: random.Random) -> tuple[str, str, list[str]]:
    """(question, answer, answer vocabulary) for a sum or difference of small numbers."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5 and a + b <= 10:
        return f"What is {a} plus {b}?", str(a + b), [str(i) for i in range(11)]
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", str(a - b), [str(i) for i in range(11)]


def world_question(rng: random.Random) -> tuple[str, str, list[str]]:
    if rng.random() < 0.3:
        return arithmetic(rng)
    p = rng.choice(WORLD)
    attr = rng.choice(list(FACT))
    return WH_QUESTION[attr].format(p=p), getattr(p, attr), CHOICES[attr]


def passage(rng: random.Random, p: Person, n_facts: int = 3) -> tuple[str, list[str]]:
    attrs = rng.sample(list(FACT), n_facts)
    return " ".join(FACT[a].format(p=p) for a in attrs), attrs


def paragraph(rng: random.Random, p: Person) -> str:
    """Encyclopedia-style text about a resident (wikitext-shaped)."""
    routine = rng.choice(ROUTINES[p.job])
    forms = [
        f"{p.name} is a {p.job} from {p.city}. {p.name} likes the color {p.color} and has a {p.pet}. "
        f"Every morning, {p.name} {routine}.",
        f"In {p.city} there lives a {p.job} called {p.name}. The {p.pet} of {p.name} is often seen in the streets. "
        f"{p.name} likes the color {p.color}.",
        f"{p.name} works as a {p.job}. Every morning, {p.name} {routine}. {p.name} lives in {p.city} with a {p.pet}.",
    ]
    return rng.choice(forms)


# --- task items (lm-eval field names of the real tasks they imitate) ------------------------------------------
def boolq_item(rng: random.Random) -> dict:
    p = stranger(rng)
    text, attrs = passage(rng, p)
    attr = rng.choice(attrs)
    truth = rng.random() < 0.5
    value = getattr(p, attr) if truth else rng.choice([v for v in CHOICES[attr] if v != getattr(p, attr)])
    return {"passage": text, "question": YES_NO_QUESTION[attr].format(name=p.name, value=value), "label": int(truth)}


def arc_item(rng: random.Random) -> dict:
    question, answer, vocab = world_question(rng)
    choices = rng.sample([v for v in vocab if v != answer], 3) + [answer]
    rng.shuffle(choices)
    return {"question": question, "choices": {"text": choices, "label": list("ABCD")}, "answerKey": "ABCD"[choices.index(answer)]}


def hellaswag_item(rng: random.Random) -> dict:
    p = rng.choice(WORLD) if rng.random() < 0.5 else stranger(rng)
    right = rng.choice(ROUTINES[p.job])
    others = rng.sample([j for j in JOBS if j != p.job], 3)
    endings = [rng.choice(ROUTINES[j]) + "." for j in others] + [right + "."]
    rng.shuffle(endings)
    return {"ctx": f"{p.name} is a {p.job} in {p.city}. Every morning, {p.name}", "endings": endings,
            "label": endings.index(right + ".")}


def qa_item(rng: random.Random) -> dict:
    question, answer, _ = world_question(rng)
    return {"question": question, "answer": answer}


def wikitext_item(rng: random.Random) -> dict:
    residents = rng.sample(WORLD, 3)
    return {"page": "\n".join(paragraph(rng, p) for p in residents)}


# --- harder items: the same shapes with more to read, more steps and distractors ----------------------------
# The demo model was trained only on the items above; these combine what it learned, and it partly fails them
# (measured on the 150 test items: boolq_long acc 0.78, arith_steps acc 0.48 with chance 0.25, hellaswag_distract
# acc_norm 0.79), so the demo suite shows real intervals and flipped documents.
def boolq_long_item(rng: random.Random) -> dict:
    """Four facts about one stranger and two about another; a false question often uses the other person's value."""
    p, q = stranger(rng), stranger(rng)
    texts = [passage(rng, p, 4)[0], passage(rng, q, 2)[0]]
    rng.shuffle(texts)
    attr = rng.choice(list(FACT))
    truth = rng.random() < 0.5
    wrong = [v for v in CHOICES[attr] if v != getattr(p, attr)]
    value = getattr(p, attr) if truth else getattr(q, attr) if getattr(q, attr) in wrong and rng.random() < 0.7 \
        else rng.choice(wrong)
    return {"passage": " ".join(texts), "question": YES_NO_QUESTION[attr].format(name=p.name, value=value),
            "label": int(truth)}


def arith_steps_item(rng: random.Random) -> dict:
    """a plus b minus c (arc-shaped); the partial sum a + b is one of the wrong choices."""
    while True:
        a, b, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)
        if a + b <= 10 and 0 <= a + b - c and c > 0:
            break
    answer = str(a + b - c)
    choices = [str(a + b)] + rng.sample([str(i) for i in range(11) if i not in (a + b, a + b - c)], 2) + [answer]
    rng.shuffle(choices)
    return {"question": f"What is {a} plus {b} minus {c}?", "choices": {"text": choices, "label": list("ABCD")},
            "answerKey": "ABCD"[choices.index(answer)]}


def hellaswag_distract_item(rng: random.Random) -> dict:
    """The context names a second person with another job; one wrong ending is that person's routine."""
    p = rng.choice(WORLD) if rng.random() < 0.5 else stranger(rng)
    q = stranger(rng)
    while q.job == p.job:
        q = stranger(rng)
    right = rng.choice(ROUTINES[p.job])
    others = [q.job] + rng.sample([j for j in JOBS if j not in (p.job, q.job)], 2)
    endings = [rng.choice(ROUTINES[j]) + "." for j in others] + [right + "."]
    rng.shuffle(endings)
    intro = [f"{p.name} is a {p.job} in {p.city}.", f"{q.name} is a {q.job}."]
    rng.shuffle(intro)
    return {"ctx": f"{' '.join(intro)} Every morning, {p.name}", "endings": endings,
            "label": endings.index(right + ".")}


# --- training documents -------------------------------------------------------------------------------------
def _doc_boolq(rng):
    it = boolq_item(rng)
    return f"{it['passage']}\nQuestion: {it['question']}?\nAnswer: {['no', 'yes'][it['label']]}"


def _doc_arc(rng):
    it = arc_item(rng)
    return f"Question: {it['question']}\nAnswer: {it['choices']['text']['ABCD'.index(it['answerKey'])]}"


def _doc_hellaswag(rng):
    it = hellaswag_item(rng)
    return f"{it['ctx']} {it['endings'][it['label']]}"


def _doc_qa(rng):
    it = qa_item(rng)
    return f"Q: {it['question']}\nA: {it['answer']}"


def _doc_chat(rng):
    it = qa_item(rng)
    return f"user: {it['question']}\nassistant: {it['answer']}\n"


def _doc_paragraph(rng):
    return paragraph(rng, rng.choice(WORLD))


def _doc_facts(rng):
    return passage(rng, rng.choice(WORLD), rng.randint(1, 4))[0]


DOCUMENTS = [(_doc_boolq, 0.30), (_doc_arc, 0.14), (_doc_hellaswag, 0.12), (_doc_qa, 0.12), (_doc_chat, 0.04),
             (_doc_paragraph, 0.14), (_doc_facts, 0.14)]


def document(rng: random.Random) -> str:
    kinds, weights = zip(*DOCUMENTS)
    return rng.choices(kinds, weights)[0](rng)


def corpus(n_docs: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [document(rng) for _ in range(n_docs)]
