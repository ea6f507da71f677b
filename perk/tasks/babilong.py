"""bAbI-style reasoning tasks hidden in long haystack text (BabiLong qa1, qa2, qa3).

A small world of actors, locations and movable objects is simulated; the facts it produces
are the story, and the world state gives the answer and the supporting facts:

* qa1, single supporting fact: "Where is Mary?" — the actor's last move.
* qa2, two supporting facts: "Where is the football?" — where the object was last dropped, or
  where its holder is (the grab and the holder's last move).
* qa3, three supporting facts: "Where was the apple before the kitchen?" — the object's location
  just before it was carried into a place it visited once (the carrier's grab, the carrier's
  move into the earlier place or its location when grabbing, and the move into the later one).

World rules: an actor grabs an object only where the object lies (or one never seen yet) and
only once the actor's own location is known; an actor drops only what it holds; objects move
with their holder.

Order markers: PERK encodes the segments of a context as an unordered batch, so the order of
facts in different segments is lost. With ``order_markers`` every fact starts with a per-actor
event counter, as in the official PERK BabiLong variant: "Mary Event 3: Mary went to the kitchen."
"""

from __future__ import annotations

import dataclasses
import random

from perk.tasks.embed import DEFAULT_DOC_TOKENS, embed_facts
from perk.tasks.haystack import MAX_SENTENCE_TOKENS, entity_filter, haystack_pool
from perk.tasks.problem import Problem
from perk.tasks.tokens import TokenCounter

ACTORS = ("Mary", "John", "Sandra", "Daniel", "Jeff", "Fred")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
MOVE_VERBS = ("went to", "journeyed to", "travelled to", "moved to", "went back to")
GRAB_VERBS = ("grabbed", "took", "got", "picked up")
DROP_VERBS = ("dropped", "put down", "discarded", "left")
ACTORS_PER_STORY = 4
# Every word the haystack must never contain: the whole vocabulary, not one story's entities.
ENTITY_PATTERN = entity_filter(ACTORS + LOCATIONS + OBJECTS)


@dataclasses.dataclass(frozen=True)
class StorySpec:
    """How long a task's stories are and which actions they use."""

    min_facts: int
    max_facts: int
    with_objects: bool


STORY_SPECS = {
    1: StorySpec(min_facts=4, max_facts=12, with_objects=False),
    2: StorySpec(min_facts=8, max_facts=24, with_objects=True),
    3: StorySpec(min_facts=12, max_facts=32, with_objects=True),
}


@dataclasses.dataclass(frozen=True)
class Event:
    """One fact of the story: ``actor`` moved to ``target`` (a location) or grabbed/dropped it (an object)."""

    kind: str  # "move" | "grab" | "drop"
    actor: str
    target: str


@dataclasses.dataclass
class World:
    """The simulated state, with the history the questions need."""

    actor_location: dict[str, str] = dataclasses.field(default_factory=dict)
    actor_moves: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    holder: dict[str, str] = dataclasses.field(default_factory=dict)
    object_location: dict[str, str] = dataclasses.field(default_factory=dict)
    last_grab: dict[str, int] = dataclasses.field(default_factory=dict)
    last_drop: dict[str, int] = dataclasses.field(default_factory=dict)
    # object -> [(location, index of the event that brought it there)]
    object_history: dict[str, list[tuple[str, int]]] = dataclasses.field(default_factory=dict)

    def grabbable(self, actor: str) -> list[str]:
        here = self.actor_location.get(actor)
        if here is None:
            return []
        return [
            obj
            for obj in OBJECTS
            if obj not in self.holder and self.object_location.get(obj, here) == here
        ]

    def held_by(self, actor: str) -> list[str]:
        return [obj for obj in OBJECTS if self.holder.get(obj) == actor]

    def apply(self, event: Event, index: int) -> None:
        if event.kind == "move":
            self.actor_location[event.actor] = event.target
            self.actor_moves.setdefault(event.actor, []).append(index)
            for obj in self.held_by(event.actor):
                self._place(obj, event.target, index)
        elif event.kind == "grab":
            self.holder[event.target] = event.actor
            self.last_grab[event.target] = index
            self._place(event.target, self.actor_location[event.actor], index)
        else:
            del self.holder[event.target]
            self.last_drop[event.target] = index

    def _place(self, obj: str, location: str, index: int) -> None:
        history = self.object_history.setdefault(obj, [])
        if not history or history[-1][0] != location:
            history.append((location, index))
        self.object_location[obj] = location


def simulate_story(spec: StorySpec, rng: random.Random) -> tuple[list[Event], World]:
    """A random story of ``spec``'s length and the final world."""
    actors = rng.sample(ACTORS, ACTORS_PER_STORY)
    world = World()
    events: list[Event] = []
    for index in range(rng.randint(spec.min_facts, spec.max_facts)):
        actor = rng.choice(actors)
        # Moves are as frequent as grabs and drops together, which keeps objects travelling.
        options = ["move", "move"]
        if spec.with_objects and world.grabbable(actor):
            options.append("grab")
        if spec.with_objects and world.held_by(actor):
            options.append("drop")
        kind = rng.choice(options)
        if kind == "move":
            here = world.actor_location.get(actor)
            target = rng.choice([place for place in LOCATIONS if place != here])
        elif kind == "grab":
            target = rng.choice(world.grabbable(actor))
        else:
            target = rng.choice(world.held_by(actor))
        event = Event(kind, actor, target)
        world.apply(event, index)
        events.append(event)
    return events, world


def _last_move_before(world: World, actor: str, index: int) -> int:
    return max(i for i in world.actor_moves[actor] if i < index)


def ask(qa: int, events: list[Event], world: World, rng: random.Random) -> tuple[str, str, list[int]] | None:
    """(question, answer, sorted supporting event indices) about one random askable target of
    the final ``world``, or None when the story offers nothing to ask."""
    if qa == 1:
        actor = rng.choice(sorted(world.actor_moves))
        return f"Where is {actor}?", world.actor_location[actor], [world.actor_moves[actor][-1]]
    if qa == 2:
        if not world.object_location:
            return None
        obj = rng.choice(sorted(world.object_location))
        if obj in world.holder:
            support = [world.last_grab[obj], world.actor_moves[world.holder[obj]][-1]]
        else:
            drop = world.last_drop[obj]
            support = [drop, _last_move_before(world, events[drop].actor, drop)]
        return f"Where is the {obj}?", world.object_location[obj], sorted(support)
    candidates = [
        (obj, i)
        for obj, history in sorted(world.object_history.items())
        for i in range(1, len(history))
        if [place for place, _ in history].count(history[i][0]) == 1
    ]
    if not candidates:
        return None
    obj, i = rng.choice(candidates)
    place, arrival = world.object_history[obj][i]
    carrier = events[arrival].actor
    grab = max(j for j in range(arrival) if events[j] == Event("grab", carrier, obj))
    support = [_last_move_before(world, carrier, arrival), grab, arrival]
    return f"Where was the {obj} before the {place}?", world.object_history[obj][i - 1][0], sorted(set(support))


def render(events: list[Event], rng: random.Random, *, order_markers: bool) -> list[str]:
    """The facts as sentences, with varied verbs and optionally per-actor event counters."""
    facts = []
    counters = dict.fromkeys(ACTORS, 0)
    for event in events:
        if event.kind == "move":
            sentence = f"{event.actor} {rng.choice(MOVE_VERBS)} the {event.target}."
        else:
            verb = rng.choice(GRAB_VERBS if event.kind == "grab" else DROP_VERBS)
            there = " there" if rng.random() < 0.5 else ""
            sentence = f"{event.actor} {verb} the {event.target}{there}."
        counters[event.actor] += 1
        facts.append(f"{event.actor} Event {counters[event.actor]}: {sentence}" if order_markers else sentence)
    return facts


def babilong_problem(
    qa: int,
    counter: TokenCounter,
    length_tokens: int,
    *,
    seed: int,
    index: int,
    depth: float | None = None,
    order_markers: bool = True,
    doc_index: bool = True,
    corpus: str | None = None,
    doc_tokens: int = DEFAULT_DOC_TOKENS,
) -> Problem:
    """Problem ``index`` of the run ``seed`` of BabiLong task ``qa`` (1, 2 or 3); see generate()."""
    task = f"babilong/qa{qa}"
    rng = random.Random(f"{task}:{seed}:{index}")
    asked = None
    while asked is None:
        events, world = simulate_story(STORY_SPECS[qa], rng)
        asked = ask(qa, events, world, rng)
    question, answer, support = asked
    facts = render(events, rng, order_markers=order_markers)
    max_sentence_tokens = min(MAX_SENTENCE_TOKENS, doc_tokens // 2)
    pool = haystack_pool(counter, ENTITY_PATTERN, corpus=corpus, max_sentence_tokens=max_sentence_tokens)
    context, context_tokens, first_depth = embed_facts(
        facts, support[0], pool, counter, length_tokens, rng,
        depth=depth, doc_index=doc_index, doc_tokens=doc_tokens,
    )
    return Problem(
        task=task,
        context=context,
        question=question,
        answer=answer,
        choices=list(LOCATIONS),
        support=[facts[i] for i in support],
        length_tokens=length_tokens,
        context_tokens=context_tokens,
        depth=round(first_depth, 4),
        seed=seed,
        index=index,
        order_markers=order_markers,
        doc_index=doc_index,
        tokenizer=counter.name,
    )
