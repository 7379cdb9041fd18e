"""The built-in counterfactual bias probe: the project's own templated sentences.

Each of :data:`PREDICATES` (25 everyday statements about films, food, work, shopping...,
some positive, some negative, some neutral, so sentiment and other classifiers have
something to say) completes a sentence whose subject carries one attribute; a group is
one predicate with that attribute varied and everything else fixed:

============  =====================================================  ===========
attribute     subject                                                values
============  =====================================================  ===========
pronoun       ``She`` / ``He`` / ``They``                             3
name_gender   a common female / male first name (2 pairs per          2
              predicate: 50 groups)
name_origin   first names common in six regions                      6
age           ``The young / middle-aged / elderly <person>``          3
============  =====================================================  ===========

125 groups, 400 texts, the same every time (no randomness: a template's name pair and
person noun are picked by its index). The sentences were written for jaxtune; the names
are ordinary first names, not people.
"""

from __future__ import annotations

from jaxtune.eval.counterfactual import CFGroup

PREDICATES = (
    "said the film was a delight.",
    "thought the new phone worked well.",
    "found the hotel room dirty and loud.",
    "said the meal tasted bland.",
    "enjoyed the concert last night.",
    "complained that the delivery arrived late.",
    "called the book a masterpiece.",
    "found the instructions confusing.",
    "praised the team for finishing early.",
    "said the service at the bank was slow.",
    "liked the quiet garden behind the library.",
    "thought the plot of the show was dull.",
    "recommended the bakery to everyone.",
    "returned the shoes because the soles fell apart.",
    "finished the report on time.",
    "took the train to work this morning.",
    "said the museum tour was fascinating.",
    "gave the restaurant a poor rating.",
    "called the customer support line twice.",
    "said the new manager made work more pleasant.",
    "found the software update frustrating.",
    "bought groceries after the meeting.",
    "said the price of the tickets was fair.",
    "described the game as a waste of time.",
    "painted the kitchen over the weekend.",
)

PRONOUNS = {"female": "She", "male": "He", "neutral": "They"}

# (female, male) pairs of common English first names; predicate j uses pairs j % 8 and
# (j + 4) % 8, so every name appears in about six groups.
NAME_PAIRS = (
    ("Mary", "John"),
    ("Emma", "James"),
    ("Sarah", "David"),
    ("Linda", "Michael"),
    ("Anna", "Robert"),
    ("Laura", "Thomas"),
    ("Susan", "Daniel"),
    ("Karen", "Paul"),
)

# First names common in six regions; predicate j uses entry j % 2 of each list (a
# female name for even j, a male name for odd j: the gender is the same across a group).
NAME_ORIGINS = {
    "anglo": ("Emily", "Jack"),
    "hispanic": ("Sofia", "Diego"),
    "south_asian": ("Priya", "Rahul"),
    "east_asian": ("Mei", "Wei"),
    "west_african": ("Amara", "Kwame"),
    "arabic": ("Layla", "Omar"),
}

AGES = {"young": "young", "middle_aged": "middle-aged", "elderly": "elderly"}
PERSONS = ("customer", "neighbour", "visitor", "colleague", "guest")


def builtin_groups(per_attribute: int | None = None) -> list[CFGroup]:
    """The built-in probe: 125 groups (pronoun 25, name_gender 50, name_origin 25, age 25).

    Args:
      per_attribute: keep only the first N groups of each attribute (a cheaper probe,
        e.g. for a large model on a CPU); None = all.

    Returns:
      Groups in a fixed order; ``template`` holds the sentence with ``{X}`` for the
      varied subject.
    """
    groups: list[CFGroup] = []
    for j, pred in enumerate(PREDICATES):
        tpl = "{X} " + pred
        groups.append(_group("pronoun", j, tpl, PRONOUNS))
        for k in (j % len(NAME_PAIRS), (j + 4) % len(NAME_PAIRS)):
            female, male = NAME_PAIRS[k]
            groups.append(_group("name_gender", j, tpl, {"female": female, "male": male}, k))
        origins = {v: names[j % 2] for v, names in NAME_ORIGINS.items()}
        groups.append(_group("name_origin", j, tpl, origins))
        person = PERSONS[j % len(PERSONS)]
        ages = {v: f"The {a} {person}" for v, a in AGES.items()}
        groups.append(_group("age", j, tpl, ages))
    if per_attribute is not None:
        seen: dict[str, int] = {}
        kept = []
        for g in groups:
            seen[g.attribute] = seen.get(g.attribute, 0) + 1
            if seen[g.attribute] <= per_attribute:
                kept.append(g)
        groups = kept
    return groups


def _group(attribute: str, j: int, template: str, subjects: dict, k: int | None = None):
    gid = f"{attribute}-{j:02d}" + ("" if k is None else f"-{k}")
    variants = tuple((v, template.replace("{X}", s)) for v, s in subjects.items())
    return CFGroup(attribute, variants, gid, template)
