"""Drops-in-the-Ocean-style student records: a database of one document per student.

Each document reads "Student 1234567, Name: Ada Lovelace, Year: Junior, School: School of
Engineering, Major: Computer Science, Grade: 87". Enough records are drawn to fill the target
length, and one question is asked about them:

* recall: the name, year, school, major or grade of one student (by id);
* relation: yes/no — a higher grade than another student, the same major, school or year;
* aggregate: the highest, lowest or average grade (average rounded half up to one decimal) over
  all students or those of one year, school or major.
"""

from __future__ import annotations

import dataclasses
import functools
import random

from perk.tasks.problem import Problem
from perk.tasks.tokens import TokenCounter

YEARS = ("Freshman", "Sophomore", "Junior", "Senior")
MAJORS_BY_SCHOOL = {
    "School of Engineering": (
        "Computer Science", "Electrical Engineering", "Mechanical Engineering", "Civil Engineering",
    ),
    "School of Arts and Sciences": ("Mathematics", "Physics", "Biology", "History", "Psychology"),
    "School of Business": ("Finance", "Accounting", "Marketing", "Economics"),
    "School of Health Sciences": ("Nursing", "Public Health", "Nutrition"),
    "School of Fine Arts": ("Music", "Theatre", "Graphic Design"),
}
SCHOOLS = tuple(MAJORS_BY_SCHOOL)
MAJORS = tuple(major for majors in MAJORS_BY_SCHOOL.values() for major in majors)
FIRST_NAMES = (
    "Ada", "Alan", "Beatrice", "Carlos", "Chen", "Dana", "Elena", "Farid", "Grace", "Hiro",
    "Ingrid", "Jamal", "Kara", "Liam", "Maya", "Nadia", "Omar", "Priya", "Quentin", "Rosa",
    "Sofia", "Tariq", "Uma", "Victor", "Wen", "Ximena", "Yusuf", "Zoe", "Aiden", "Bianca",
)
LAST_NAMES = (
    "Lovelace", "Turing", "Okafor", "Garcia", "Nakamura", "Novak", "Rossi", "Haddad", "Kim",
    "Schmidt", "Moreau", "Silva", "Kowalski", "Petrov", "Adeyemi", "Larsen", "Dubois", "Reyes",
    "Tanaka", "Fischer", "Costa", "Singh", "Murphy", "Nguyen", "Hansen", "Ibrahim", "Walsh",
)
RECALL_FIELDS = ("name", "year", "school", "major", "grade")
RELATIONS = ("grade", "major", "school", "year")
AGGREGATES = ("highest", "lowest", "average")
SUBSETS = ("all", "year", "school", "major")
_FIELD_CHOICES = {"year": YEARS, "school": SCHOOLS, "major": MAJORS}
ID_POOL_SIZE = 100_000
# A first guess of tokens per record; the real average takes over after the first batch.
_GUESS_RECORD_TOKENS = 40


@dataclasses.dataclass(frozen=True)
class Student:
    """One record of the database."""

    id: str
    name: str
    year: str
    school: str
    major: str
    grade: int

    def document(self) -> str:
        return record_document(self.id, self.name, self.year, self.school, self.major, self.grade)


def record_document(student_id: object, name: object, year: object, school: object, major: object, grade: object) -> str:
    """One student record as one document, for generated and read databases alike: "Student
    1234567, Name: ..., Year: ..., School: ..., Major: ..., Grade: 87". perk's own serialisation: the
    official code's ``dict_to_sequence`` writes records differently (e.g. "Student <3109998>")."""
    return f"Student {student_id}, Name: {name}, Year: {year}, School: {school}, Major: {major}, Grade: {grade}"


@functools.lru_cache(maxsize=1)
def student_ids() -> tuple[str, ...]:
    """The fixed set of 7-digit ids students are drawn from. A fixed set (not any 7-digit number)
    lets the token counter memoise each id's count instead of tokenising every record."""
    return tuple(str(i) for i in random.Random("perk-student-ids").sample(range(1_000_000, 10_000_000), ID_POOL_SIZE))


def random_students(rng: random.Random, k: int, used_ids: set[str]) -> list[Student]:
    """Up to ``k`` random records with ids not in ``used_ids`` (which grows), majors of their school."""
    pool = student_ids()
    if len(used_ids) + k > len(pool):
        raise ValueError(f"a database of more than {len(pool)} students is not supported")
    ids = [pool[i] for i in rng.sample(range(len(pool)), k) if pool[i] not in used_ids]
    used_ids.update(ids)
    schools = rng.choices(SCHOOLS, k=len(ids))
    return [
        Student(id=student_id, name=f"{first} {last}", year=year, school=school,
                major=rng.choice(MAJORS_BY_SCHOOL[school]), grade=grade)
        for student_id, first, last, year, school, grade in zip(
            ids,
            rng.choices(FIRST_NAMES, k=len(ids)),
            rng.choices(LAST_NAMES, k=len(ids)),
            rng.choices(YEARS, k=len(ids)),
            schools,
            rng.choices(range(101), k=len(ids)),
        )
    ]


def _body_cost(counter: TokenCounter, students: list[Student], doc_index: bool) -> list[int]:
    # With a prefix the body follows "doc_<i>:" after a space (counted apart, see perk.tasks.tokens).
    return counter.count_words([s.document() for s in students], following=doc_index)


def _prefix_cost(counter: TokenCounter, position: int, doc_index: bool) -> int:
    return counter.count(f"doc_{position}:") if doc_index else 0


def fill_database(
    counter: TokenCounter, length_tokens: int, rng: random.Random, doc_index: bool
) -> tuple[list[Student], list[int]]:
    """Records (and each one's document body cost) while each brings the total closer to
    ``length_tokens``, so the total ends within half a record of it."""
    students: list[Student] = []
    costs: list[int] = []
    used_ids: set[str] = set()
    total = 0
    while True:
        per_record = total / len(students) if students else _GUESS_RECORD_TOKENS
        batch = random_students(rng, max(1, int((length_tokens - total) / per_record)), used_ids)
        for student, cost in zip(batch, _body_cost(counter, batch, doc_index)):
            cost_with_prefix = cost + _prefix_cost(counter, len(students), doc_index)
            if total + cost_with_prefix - length_tokens > length_tokens - total:
                if not students:
                    raise ValueError(f"length_tokens={length_tokens} is too short for one student record")
                return students, costs
            students.append(student)
            costs.append(cost)
            total += cost_with_prefix


def _half_up_one_decimal(total: int, count: int) -> str:
    tenths = (20 * total + count) // (2 * count)  # floor(10·total/count + 1/2), exact in integers
    return f"{tenths // 10}.{tenths % 10}"


def _ask_recall(students: list[Student], rng: random.Random) -> tuple[str, str, list[str], list[Student]]:
    student = rng.choice(students)
    field = rng.choice(RECALL_FIELDS)
    answer = str(getattr(student, field))
    return f"What is the {field} of student {student.id}?", answer, list(_FIELD_CHOICES.get(field, ())), [student]


def _ask_relation(students: list[Student], rng: random.Random) -> tuple[str, str, list[str], list[Student]]:
    relation = rng.choice(RELATIONS)
    want_yes = rng.random() < 0.5
    first = rng.choice(students)
    others = [s for s in students if s is not first]
    if relation == "grade":
        second = rng.choice(others)
        if (first.grade > second.grade) != want_yes and first.grade != second.grade:
            first, second = second, first
        answer = first.grade > second.grade
        question = f"Does student {first.id} have a higher grade than student {second.id}?"
    else:
        same = [s for s in others if getattr(s, relation) == getattr(first, relation)]
        different = [s for s in others if getattr(s, relation) != getattr(first, relation)]
        second = rng.choice((same if want_yes else different) or same or different)
        answer = getattr(first, relation) == getattr(second, relation)
        question = f"Do students {first.id} and {second.id} have the same {relation}?"
    return question, "yes" if answer else "no", ["yes", "no"], [first, second]


def _ask_aggregate(students: list[Student], rng: random.Random) -> tuple[str, str, list[str], list[Student]]:
    kind = rng.choice(AGGREGATES)
    subset = rng.choice(SUBSETS)
    if subset == "all":
        members, among = students, "all students"
    else:
        value = getattr(rng.choice(students), subset)
        members = [s for s in students if getattr(s, subset) == value]
        among = {
            "year": f"{value} students",
            "school": f"students in the {value}",
            "major": f"students majoring in {value}",
        }[subset]
    grades = [s.grade for s in members]
    if kind == "average":
        answer, support = _half_up_one_decimal(sum(grades), len(grades)), members
    else:
        extreme = max(grades) if kind == "highest" else min(grades)
        answer, support = str(extreme), [s for s in members if s.grade == extreme]
    return f"What is the {kind} grade among {among}?", answer, [], support


_ASKERS = {"recall": _ask_recall, "relation": _ask_relation, "aggregate": _ask_aggregate}
KINDS = tuple(_ASKERS)


def _place_support(
    students: list[Student], support: list[Student], depth: float, rng: random.Random
) -> list[Student]:
    """Reorder so the first supporting record sits at ``depth`` of the records, the others after it."""
    rest = [s for s in students if all(s is not t for t in support)]
    first = min(round(depth * (len(students) - 1)), len(students) - len(support))
    slots = [first] + sorted(rng.sample(range(first + 1, len(students)), len(support) - 1))
    ordered: list[Student | None] = [None] * len(students)
    for slot, student in zip(slots, support):
        ordered[slot] = student
    remaining = iter(rest)
    return [s if s is not None else next(remaining) for s in ordered]


def student_records_problem(
    kind: str,
    counter: TokenCounter,
    length_tokens: int,
    *,
    seed: int,
    index: int,
    depth: float | None = None,
    doc_index: bool = True,
) -> Problem:
    """Problem ``index`` of the run ``seed`` of ``student_records/<kind>``; see generate()."""
    task = f"student_records/{kind}"
    if depth is not None and kind == "aggregate":
        raise ValueError("depth is not supported for student_records/aggregate: its support spans the database")
    rng = random.Random(f"{task}:{seed}:{index}")
    students, costs = fill_database(counter, length_tokens, rng, doc_index)
    if kind == "relation" and len(students) < 2:
        raise ValueError(f"length_tokens={length_tokens} is too short for two student records")
    cost_of = {s.id: cost for s, cost in zip(students, costs)}
    question, answer, choices, support = _ASKERS[kind](students, rng)
    if depth is not None:
        students = _place_support(students, support, depth, rng)
    starts, total = {}, 0
    for position, student in enumerate(students):
        prefix = _prefix_cost(counter, position, doc_index)
        starts[student.id] = total + prefix
        total += prefix + cost_of[student.id]
    context = [
        (f"doc_{position}: " if doc_index else "") + student.document() for position, student in enumerate(students)
    ]
    support_in_order = sorted(support, key=lambda s: starts[s.id])
    return Problem(
        task=task,
        context=context,
        question=question,
        answer=answer,
        choices=choices,
        support=[s.document() for s in support_in_order],
        length_tokens=length_tokens,
        context_tokens=total,
        depth=round(starts[support_in_order[0].id] / total, 4),
        seed=seed,
        index=index,
        order_markers=False,
        doc_index=doc_index,
        tokenizer=counter.name,
    )
