"""Fact recall, the second long-context probe (issue 23): a fact stated once early in real text, asked about at the
end, scored by the answer's likelihood. Unlike the passkey it is not digits, not one fixed sentence, and not what
the passkey proxy was fine-tuned on.

A sample of `length` tokens:

    haystack (real text) with the fact sentence inserted at a sentence boundary near `depth` | question

    fact:     "The river that runs past the old mill is called the Wend."     (one of TEMPLATES, the answer drawn
    question: "What is the river past the old mill called? It is called the"   from its own list of answers)

The model reads the sample (the question is the protected tail a pruned model keeps, as a user's prompt ends with
its question), then every candidate answer, the true one and `choices - 1` others from the same template's list, is
scored by its log-likelihood after the prompt (its tokens run through every layer, as generated tokens do:
MambaLM.step from the prefill's states). A sample is correct when the true answer is the most likely: chance is
1 / choices. Samples are a pure function of (text stream, length, depth, seed): haystacks of held-out text for
evaluation, never of the text a method was tuned on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from .flops import count
from .model import MambaLM
from .passkey import protected_prompt
from .pruning import SimbaConfig

# (fact with {a} for the answer, question ending where the answer follows, the answers it may take)
TEMPLATES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("The river that runs past the old mill is called the {a}.",
     "What is the river past the old mill called? It is called the",
     ("Wend", "Arrow", "Tamble", "Silverrun", "Haddon", "Corrin", "Mere", "Loddon")),
    ("Her grandmother's favourite colour was always {a}.",
     "What was her grandmother's favourite colour? It was",
     ("purple", "yellow", "green", "orange", "silver", "crimson", "blue", "pink")),
    ("The captain named his ship the {a}.",
     "What did the captain name his ship? He named it the",
     ("Albatross", "Morning Star", "Resolute", "Gull", "Persephone", "Windward", "Marigold", "Kestrel")),
    ("The key to the cellar is hidden under the {a}.",
     "Where is the key to the cellar hidden? It is hidden under the",
     ("doormat", "flowerpot", "stairs", "piano", "bookcase", "bed", "stove", "carpet")),
    ("The old farmer's dog was called {a}.",
     "What was the old farmer's dog called? The dog was called",
     ("Biscuit", "Rufus", "Pepper", "Shadow", "Barnaby", "Tess", "Ziggy", "Bramble")),
    ("The secret ingredient in her soup is {a}.",
     "What is the secret ingredient in her soup? The secret ingredient is",
     ("nutmeg", "honey", "ginger", "saffron", "vinegar", "cinnamon", "garlic", "mustard")),
    ("The conference next spring will be held in {a}.",
     "Where will the conference next spring be held? It will be held in",
     ("Lisbon", "Helsinki", "Toronto", "Nairobi", "Kyoto", "Edinburgh", "Santiago", "Vienna")),
    ("The painting above the fireplace shows a {a}.",
     "What does the painting above the fireplace show? It shows a",
     ("lighthouse", "windmill", "horse", "shipwreck", "waterfall", "fox", "cathedral", "violin")),
    ("The stranger at the inn said that his name was {a}.",
     "What did the stranger at the inn say his name was? He said his name was",
     ("Oswald", "Tobias", "Ambrose", "Lionel", "Cedric", "Jasper", "Mortimer", "Felix")),
    ("The little girl's doll was made of {a}.",
     "What was the little girl's doll made of? It was made of",
     ("porcelain", "straw", "wood", "cloth", "wax", "clay", "tin", "leather")),
    ("The professor keeps his notes in a {a} box.",
     "What kind of box does the professor keep his notes in? He keeps them in a",
     ("cedar", "velvet", "copper", "shoe", "cardboard", "lacquered", "walnut", "cigar")),
    ("The password to the old archive is {a}.",
     "What is the password to the old archive? The password is",
     ("marmalade", "thunderbolt", "peppermint", "lantern", "quicksilver", "buttercup", "hazelnut", "tapestry")),
)


# For fine-tuning a proxy to recall (benchmarks/passkey_proxy.py --facts): other relations, other wordings and
# other answers than TEMPLATES, which stay held out for evaluation.
TRAIN_TEMPLATES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("The lighthouse keeper's cat goes by the name of {a}.", "What name does the lighthouse keeper's cat go by? It goes by",
     ("Muffin", "Sooty", "Ginger", "Whiskers", "Tabitha", "Smudge", "Pumpkin", "Marmalade")),
    ("Everyone in the village knows that the baker's favourite flower is the {a}.",
     "What is the baker's favourite flower? The baker's favourite flower is the",
     ("tulip", "daisy", "orchid", "sunflower", "poppy", "lily", "magnolia", "bluebell")),
    ("The treasure was buried beneath the old {a} tree.", "Beneath which tree was the treasure buried? Beneath the old",
     ("oak", "willow", "chestnut", "birch", "elm", "sycamore", "beech", "yew")),
    ("My uncle works as a {a} in the harbour town.", "What does my uncle work as? He works as a",
     ("fisherman", "carpenter", "pharmacist", "blacksmith", "librarian", "surveyor", "cobbler", "chemist")),
    ("The recipe calls for two cups of {a}.", "What does the recipe call for two cups of? Two cups of",
     ("flour", "oats", "almonds", "raisins", "buttermilk", "spinach", "lentils", "barley")),
    ("The expedition set out for the mountains of {a} in early May.",
     "For which mountains did the expedition set out? The mountains of",
     ("Kashgar", "Tibesti", "Zagros", "Ruwenzori", "Altai", "Pirin", "Sierra Blanca", "Drakensberg")),
    ("The clock on the tower was built by a craftsman called {a}.",
     "Who built the clock on the tower? A craftsman called",
     ("Bartholomew", "Ignatius", "Reginald", "Humphrey", "Percival", "Quentin", "Wilfred", "Gideon")),
    ("In the story, the dragon guards a cave full of {a}.", "What does the dragon's cave hold? It is full of",
     ("emeralds", "bones", "books", "mirrors", "feathers", "lanterns", "pearls", "bells")),
    ("The code name of the operation was {a}.", "What was the operation's code name? Its code name was",
     ("Nightingale", "Overlord", "Sandstorm", "Bluebird", "Granite", "Tempest", "Harvest", "Falconer")),
    ("The school's team plays its matches in {a} shirts.", "What shirts does the school's team play in? In",
     ("maroon", "turquoise", "scarlet", "navy", "amber", "lilac", "olive", "ivory")),
    ("The museum's most famous exhibit is a {a} from ancient Egypt.",
     "What is the museum's most famous exhibit? It is a",
     ("sarcophagus", "chariot", "scarab", "papyrus", "statue", "necklace", "sundial", "mummy")),
    ("Our train to the coast departs from the station at {a}.", "Where does our train to the coast depart from? The station at",
     ("Ashford", "Blackmoor", "Kingsbridge", "Dunmore", "Eastleigh", "Fairhaven", "Glenrock", "Hollowell")),
)


@dataclass(frozen=True)
class FactSample:
    ids: torch.Tensor  # (length,) haystack with the fact, then the question (no answer)
    answers: tuple[torch.Tensor, ...]  # the candidates' token ids (each " " + answer), the true one first
    texts: tuple[str, ...]  # the candidates, the true one first
    template: int  # index in the task's templates
    depth: float  # where the fact sits in the haystack: 0 at its start, 1 at its end
    fact: tuple[int, int]  # [start, end) of the fact sentence in ids
    tail: int  # the question's tokens: what a pruned model must keep

    @property
    def length(self) -> int:
        return self.ids.numel()


class FactTask:
    """Builds fact-recall samples whose haystacks are slices of `stream` (token ids of real text, eos dropped)."""

    def __init__(self, tokenizer, stream: torch.Tensor, choices: int = 4, templates=TEMPLATES):
        if not 2 <= choices <= min(len(t[2]) for t in templates):
            raise ValueError(f"choices: must be in [2, {min(len(t[2]) for t in templates)}], got {choices}")
        self.templates = templates
        self._tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.stream = stream if eos is None else stream[stream != eos]
        self.choices = choices
        # the fact goes between a sentence or line end and a token that starts with white space: a sentence of its own
        text = {i: tokenizer.decode([i]) for i in tokenizer.get_vocab().values()}
        self._ends = torch.tensor(sorted(i for i, t in text.items() if t.endswith("\n") or t.rstrip().endswith((".", "!", "?"))))
        self._starts = torch.tensor(sorted(i for i, t in text.items() if t[:1].isspace()))

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def sample(self, length: int, depth: float, seed: int | str) -> FactSample:
        """One sample of exactly `length` tokens, the fact after the sentence end nearest to `depth` of the haystack."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth: must be in [0, 1], got {depth}")
        rng = random.Random(f"facts:{seed}:{length}:{depth}")
        t = rng.randrange(len(self.templates))
        fact_t, question_t, pool = self.templates[t]
        texts = tuple(rng.sample(pool, self.choices))  # the first is the true answer
        fact = self._encode(" " + fact_t.format(a=texts[0]))
        question = self._encode("\n\n" + question_t)
        hay = length - len(fact) - len(question)
        if hay < 2:
            raise ValueError(f"length: {length} tokens cannot hold the {len(fact) + len(question)} of fact and question")
        if hay > self.stream.numel():
            raise ValueError(f"length: the text has {self.stream.numel()} tokens, a {length}-token sample needs {hay}")
        start = rng.randrange(self.stream.numel() - hay + 1)
        haystack = self.stream[start : start + hay]
        # after the sentence end nearest to depth (the haystack's own text stays whole around the fact)
        ends = torch.nonzero(torch.isin(haystack[:-1], self._ends) & torch.isin(haystack[1:], self._starts)).flatten() + 1
        target = round(depth * hay)
        at = int(ends[(ends - target).abs().argmin()]) if ends.numel() else target
        ids = haystack[:at].tolist() + fact + haystack[at:].tolist() + question
        answers = tuple(torch.tensor(self._encode(" " + a)) for a in texts)
        return FactSample(torch.tensor(ids, dtype=torch.long), answers, texts, t, at / hay, (at, at + len(fact)),
                          len(question))

    def samples(self, length: int, depths: list[float], per_depth: int, seed: int = 0) -> list[FactSample]:
        return [self.sample(length, d, f"{seed}:{i}") for d in depths for i in range(per_depth)]


@dataclass
class FactResult:
    correct: list[bool]  # per sample: the true answer is the most likely candidate
    logprob: list[float]  # per sample: the true answer's log-likelihood (nats, summed over its tokens)
    margin: list[float]  # per sample: its log-likelihood minus the best other candidate's
    flop_ratio: float
    protect: int

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


@torch.no_grad()
def answer_logprobs(model: MambaLM, ids: torch.Tensor, answers: tuple[torch.Tensor, ...], simba) -> list[float]:
    """Log-likelihood of each answer after the prompt ids (1, l): one (pruned) prefill, then each answer's tokens
    through every layer from the prefill's states (MambaLM.step), as generation runs them."""
    out = model(ids.to(model.device), simba=simba, return_states=True, last_logits=1)
    first = torch.log_softmax(out.logits[0, -1].float(), -1)
    scores = []
    for a in answers:
        a = a.to(model.device)
        total, states = first[a[0]].item(), out.states
        for prev, nxt in zip(a[:-1], a[1:]):
            logits, states = model.step(prev.view(1), states)
            total += torch.log_softmax(logits[0].float(), -1)[nxt].item()
        scores.append(total)
    return scores


@torch.no_grad()
def evaluate_facts(
    model: MambaLM, samples: list[FactSample], simba: SimbaConfig | None = None, recent: int | None = None
) -> FactResult:
    """Accuracy of `model` on samples of one length, dense (simba None) or pruned by `simba` with the question
    protected; recent=N is the truncation baseline: the dense model reads the last N tokens."""
    length, protect, simba, start = protected_prompt(samples, simba, recent, "question")
    correct, logprob, margin = [], [], []
    for s in samples:
        lp = answer_logprobs(model, s.ids[None, start:], s.answers, simba)
        correct.append(lp[0] > max(lp[1:]))
        logprob.append(lp[0])
        margin.append(lp[0] - max(lp[1:]))
    flops = (length - start) / length if simba is None else count(model.config, simba, length).ratio
    return FactResult(correct, logprob, margin, flops, protect)
