"""The built-in corpus: short children's stories from a grammar, deterministic for a seed, no download.

Each story has a hero and a friend (names, kinds and pronouns that must agree all the way through), a
place, a wanted object and a problem; it is told in a varied order of openings, dialogue, attempts,
resolutions and endings. The same character, object and place come back several sentences later, so a
model has to learn agreement and long-range reference, not only local word statistics.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

# (name, pronoun set); "she", "he" or "they".
NAMES = [
    ("Lily", "she"), ("Tom", "he"), ("Mia", "she"), ("Ben", "he"), ("Sara", "she"), ("Max", "he"),
    ("Anna", "she"), ("Leo", "he"), ("Zoe", "she"), ("Sam", "he"), ("Emma", "she"), ("Jack", "he"),
    ("Lucy", "she"), ("Tim", "he"), ("Ella", "she"), ("Finn", "he"), ("Ruby", "she"), ("Noah", "he"),
    ("Kate", "she"), ("Oscar", "he"), ("Nora", "she"), ("Jake", "he"), ("Ivy", "she"), ("Luke", "he"),
    ("Rosa", "she"), ("Adam", "he"), ("Hana", "she"), ("Omar", "he"), ("Maya", "she"), ("Ravi", "he"),
    ("Lena", "she"), ("Hugo", "he"), ("Tara", "she"), ("Eli", "he"), ("Jade", "she"), ("Kai", "he"),
    ("Amy", "she"), ("Dan", "he"), ("Pia", "she"), ("Ted", "he"), ("Alex", "they"), ("Robin", "they"),
    ("Sky", "they"), ("Quinn", "they"), ("Rowan", "they"), ("Jules", "they"),
]

# (kind, plural); animals get a name and a pronoun like people do.
ANIMALS = [
    ("rabbit", "rabbits"), ("fox", "foxes"), ("bear", "bears"), ("cat", "cats"), ("dog", "dogs"),
    ("duck", "ducks"), ("owl", "owls"), ("frog", "frogs"), ("mouse", "mice"), ("squirrel", "squirrels"),
    ("turtle", "turtles"), ("bird", "birds"), ("puppy", "puppies"), ("kitten", "kittens"), ("pig", "pigs"),
    ("lion", "lions"), ("hen", "hens"), ("goat", "goats"), ("deer", "deer"), ("bee", "bees"),
    ("horse", "horses"), ("monkey", "monkeys"), ("penguin", "penguins"), ("snail", "snails"),
]
PET_NAMES = ["Pip", "Bolt", "Daisy", "Coco", "Milo", "Bella", "Nibbles", "Sunny", "Pepper", "Biscuit",
             "Maple", "Button", "Whiskers", "Fluffy", "Ziggy", "Honey", "Pebble", "Toby", "Luna", "Rusty"]

ADJECTIVES = ["little", "brave", "shy", "curious", "kind", "happy", "sleepy", "clever", "tiny", "friendly",
              "grumpy", "gentle", "busy", "silly", "quiet", "cheerful", "lonely", "proud", "careful", "playful"]

# (place, preposition)
PLACES = [
    ("park", "in"), ("forest", "in"), ("beach", "at"), ("garden", "in"), ("farm", "on"), ("river", "by"),
    ("hill", "on"), ("village", "in"), ("school", "at"), ("kitchen", "in"), ("library", "in"),
    ("castle", "in"), ("meadow", "in"), ("pond", "by"), ("cave", "in"), ("market", "at"), ("zoo", "at"),
    ("lake", "by"), ("playground", "at"), ("backyard", "in"), ("barn", "in"), ("island", "on"),
]

# (object, colour-able?)
OBJECTS = [
    ("ball", True), ("kite", True), ("hat", True), ("stone", True), ("box", True), ("book", True),
    ("toy car", True), ("apple", False), ("drum", True), ("map", False), ("lamp", True), ("boat", True),
    ("cup", True), ("key", False), ("blanket", True), ("flower", True), ("shell", True), ("robot", True),
    ("balloon", True), ("cookie", False), ("bell", True), ("crayon", True), ("feather", True),
    ("sandcastle", False), ("umbrella", True), ("teddy bear", False), ("puzzle", False), ("scarf", True),
]
COLOURS = ["red", "blue", "green", "yellow", "shiny", "big", "small", "pink", "purple", "golden", "old", "new"]
FEELINGS_GOOD = ["happy", "proud", "glad", "excited", "calm", "thankful"]
FEELINGS_BAD = ["sad", "worried", "scared", "upset", "lonely", "angry"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "snowy", "cloudy", "bright"]
TIMES = ["One day", "One morning", "Last summer", "On a {w} day", "One evening", "Long ago",
         "Early one morning", "After lunch one day"]


PRONOUNS = {
    "she": {"subj": "she", "obj": "her", "pos": "her", "refl": "herself", "be": "was", "has": "has"},
    "he": {"subj": "he", "obj": "him", "pos": "his", "refl": "himself", "be": "was", "has": "has"},
    "they": {"subj": "they", "obj": "them", "pos": "their", "refl": "themself", "be": "were", "has": "have"},
}


@dataclass
class Character:
    name: str  # "Lily", or "a little rabbit named Pip" on first mention
    short: str  # "Lily" or "Pip"
    p: dict[str, str]

    @property
    def subj(self) -> str:
        return self.p["subj"]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _Story:
    """One story, built sentence by sentence from a seeded random source."""

    def __init__(self, rng: random.Random):
        self.r = rng
        self.hero = self._character()
        self.friend = self._character(avoid=self.hero.short)
        obj, colourable = rng.choice(OBJECTS)
        self.obj = f"{rng.choice(COLOURS)} {obj}" if colourable and rng.random() < 0.7 else obj
        self.obj_head = obj
        self.place, self.prep = rng.choice(PLACES)
        self.weather = rng.choice(WEATHER)

    def _character(self, avoid: str = "") -> Character:
        r = self.r
        if r.random() < 0.6:
            name, pro = r.choice([n for n in NAMES if n[0] != avoid])
            adj = r.choice(ADJECTIVES)
            kind = r.choice(["girl", "boy", "kid"]) if pro != "they" else "kid"
            if pro == "she":
                kind = r.choice(["girl", "girl", "kid"])
            elif pro == "he":
                kind = r.choice(["boy", "boy", "kid"])
            intro = f"{_article(adj)} {adj} {kind} named {name}"
            return Character(intro, name, PRONOUNS[pro])
        kind, _ = r.choice(ANIMALS)
        name = r.choice([n for n in PET_NAMES if n != avoid])
        adj = r.choice(ADJECTIVES)
        pro = r.choice(["she", "he"])
        return Character(f"{_article(adj)} {adj} {kind} named {name}", name, PRONOUNS[pro])

    # --- sentences -------------------------------------------------------------------------------

    def opening(self) -> list[str]:
        r, h = self.r, self.hero
        time = r.choice(TIMES).format(w=self.weather)
        forms = [
            f"Once upon a time, there was {h.name}.",
            f"Once upon a time, {h.name} lived near a {self.place}.",
            f"{time}, {h.name} went to the {self.place}.",
            f"There once was {h.name} who loved the {self.place}.",
        ]
        first = r.choice(forms)
        likes = r.choice(["to play", "to run", "to sing", "to read", "to draw", "to explore", "to help others"])
        second = r.choice([
            f"{_cap(h.subj)} liked {likes} every day.",
            f"{_cap(h.p['pos'])} favorite thing was the {self.obj}.",
            f"{_cap(h.subj)} {h.p['be']} very {r.choice(ADJECTIVES)}.",
            f"It was a {self.weather} day, and {h.short} felt {r.choice(FEELINGS_GOOD)}.",
        ])
        return [first, second] if r.random() < 0.6 else [first]

    def meet_friend(self) -> list[str]:
        r, h, f = self.r, self.hero, self.friend
        return [r.choice([
            f"{_cap(self.prep)} the {self.place}, {h.short} met {f.name}.",
            f"Soon {h.short} saw {f.name} near a big tree.",
            f"{h.short} had a friend, {f.name}.",
            f"At the {self.place}, {h.short} found {f.name} sitting alone.",
        ]), r.choice([
            f'"Hello, {f.short}!" said {h.short}.',
            f'"Hi! Do you want to play?" asked {h.short}.',
            f'{f.short} smiled and waved at {h.p["obj"]}.',
            f'"Can I play with you?" asked {f.short}.',
        ])]

    def problem(self) -> list[str]:
        r, h, f = self.r, self.hero, self.friend
        kinds = [
            [f"Then the {self.obj} rolled away and got lost.",
             f"{h.short} looked everywhere, but {h.subj} could not find it.",
             f"{_cap(h.subj)} felt {r.choice(FEELINGS_BAD)}."],
            [f"Suddenly, the wind blew the {self.obj} up into a tall tree.",
             f"{h.short} could not reach it.",
             f'"Oh no! My {self.obj_head} is stuck!" cried {h.short}.'],
            ["But then it started to rain very hard.",
             f"{h.short} and {f.short} had to hide under a big leaf.",
             f"They were {r.choice(['cold', 'wet', 'scared'])} and wanted to go home."],
            [f"{f.short} wanted the {self.obj} too.",
             f"{h.short} did not want to share it.",
             f"{f.short} {f.p['be']} very {r.choice(FEELINGS_BAD)} and started to cry."],
            [f"On the way home, {h.short} found a small door near the {self.place}.",
             "The door was locked, and nobody knew where the key was.",
             f'"What is behind the door?" wondered {h.short}.'],
            [f"{h.short} dropped the {self.obj} into a stream near the {self.place}.",
             f"It floated away, far from {h.p['obj']}.",
             f"{_cap(h.subj)} {h.p['be']} {r.choice(FEELINGS_BAD)} and did not know what to do."],
            [f"Then {f.short} fell and hurt {f.p['pos']} knee.",
             f"{f.short} could not walk home alone.",
             f'"It hurts," said {f.short} quietly.'],
        ]
        self.problem_kind = r.randrange(len(kinds))
        return kinds[self.problem_kind]

    def attempt(self) -> list[str]:
        r, h, f = self.r, self.hero, self.friend
        fixes = [
            [f"{h.short} asked {f.short} for help.", "Together they looked under every bush and rock.",
             f"At last, {f.short} found the {self.obj} behind a log."],
            [f"{f.short} had an idea.", f'"Let\'s use a long stick!" said {f.short}.',
             f"They pushed the {self.obj} down, and it fell into {h.short}'s hands."],
            ["They waited until the rain stopped.", "Then the sun came out and made a big rainbow.",
             f"{h.short} and {f.short} laughed and ran home together."],
            [f"{h.short} thought about how {f.short} felt.", f"{_cap(h.subj)} gave the {self.obj} to {f.short} and said, \"We can share it.\"",
             f"{f.short} stopped crying and smiled."],
            [f"{h.short} and {f.short} looked for the key everywhere.", "They found it under a flower pot.",
             f"Behind the door was a garden full of {r.choice(['toys', 'flowers', 'books', 'butterflies'])}."],
            [f"{f.short} jumped into the water and swam after the {self.obj}.", f"{_cap(f.subj)} brought it back to {h.short}.",
             f'"Thank you so much!" said {h.short}.'],
            [f"{h.short} helped {f.short} stand up.", "They walked home slowly, step by step.",
             f"{f.short}'s mom put a bandage on the knee."],
        ]
        return fixes[self.problem_kind]

    def dialogue(self) -> list[str]:
        r, h, f = self.r, self.hero, self.friend
        return r.choice([
            [f'"You are a good friend," said {f.short}.', f'"So are you," said {h.short} with a smile.'],
            [f'"Thank you for helping me," said {h.short}.', f'"That is what friends do," said {f.short}.'],
            [f'"Can we play again tomorrow?" asked {f.short}.', f'"Yes, let\'s meet at the {self.place}!" said {h.short}.'],
            [f'{h.short} hugged {f.short}.', f'"I am so {r.choice(FEELINGS_GOOD)} we did it together," said {h.short}.'],
            [],
        ])

    def ending(self) -> list[str]:
        r, h, f = self.r, self.hero, self.friend
        lesson = r.choice(["sharing makes everyone happy", "it is good to help others",
                           "friends can fix problems together", "being patient is important",
                           "it is okay to ask for help", "kindness is the best gift"])
        endings = [
            f"From that day on, {h.short} and {f.short} were best friends.",
            f"{h.short} learned that {lesson}.",
            f"That night, {h.short} went to bed feeling {r.choice(FEELINGS_GOOD)}.",
            f"And they played at the {self.place} happily ever after.",
        ]
        if self.problem_kind in (0, 1, 3, 5):  # the object was part of the story
            endings.append(f"{h.short} kept the {self.obj} safe, and {h.subj} never forgot that day.")
        return [r.choice(endings)]

    def tell(self) -> str:
        r = self.r
        parts = self.opening()
        parts += self.meet_friend()
        parts += self.problem() + self.attempt()
        if r.random() < 0.4:
            parts += self.dialogue()
        parts += self.ending()
        # Occasionally start a new paragraph before the problem, as TinyStories does.
        text = " ".join(parts)
        return text.replace(" Then ", "\nThen ", 1) if r.random() < 0.3 else text


def story(index: int, seed: int = 0) -> str:
    """Story number `index` of the corpus for `seed`; the same pair always gives the same text."""
    return _Story(random.Random(seed * 1_000_003 + index)).tell()


def stories(n: int, seed: int = 0) -> Iterator[str]:
    """The first n stories of the corpus for `seed`."""
    for i in range(n):
        yield story(i, seed)
