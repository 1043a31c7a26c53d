"""Word lists the toy tasks draw from.

Lists that feed a many-answer task are ordered most-likely-first: `tasks.zipf_weights` gives
position i a weight of 1/(i+1)^s, so the order *is* the answer distribution a teacher can learn.
A few names carry non-ASCII letters on purpose: byte-level BPE splits them inside a character,
which is the case cross-vocabulary alignment (char offsets → token spans) has to survive.
"""

NAMES = (
    "Mira", "Tom", "Ana", "Leo", "Sara", "Omar", "Ivy", "Ben", "Nina", "Raj", "Kai", "Lena",
    "Paul", "Yuki", "Eva", "Sam", "Zoë", "José", "Chloé", "Noah", "Ruth", "Amir", "Tess", "Hugo",
    "Maya", "Finn", "Aisha", "Igor", "Lucy", "Pablo", "Greta", "Ravi", "Oscar", "Hana", "Felix",
    "Priya", "Diego", "Astrid", "Kofi", "Mei", "Victor", "Selma", "Tariq", "Elena", "Bruno", "Ingrid",
    "Marco", "Fatima",
)  # fmt: skip

CITIES = (
    "Oslo", "Lima", "Kyiv", "Rome", "Paris", "Cairo", "Delhi", "Tokyo", "Quito", "Accra",
    "Hanoi", "Dublin", "Madrid", "Berlin", "Vienna", "Prague", "Lisbon", "Nairobi", "Seoul",
    "Malmö", "Kraków", "Bogotá", "Athens", "Sydney", "Toronto", "Havana", "Lagos", "Manila",
    "Warsaw", "Helsinki", "Santiago", "Montreal", "Istanbul", "Jakarta", "Chicago", "Zurich",
)  # fmt: skip

# Object classes for "describe" and "list" tasks; adjectives per class are most-likely-first.
OBJECT_CLASSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # class: (objects, adjectives)
    "animal": (
        ("cat", "dog", "horse", "rabbit", "fox", "owl", "whale", "tiger", "mouse", "goat"),
        ("friendly", "quiet", "fast", "curious", "strong"),
    ),
    "fruit": (
        ("apple", "banana", "cherry", "mango", "pear", "lemon", "peach", "plum", "grape", "melon"),
        ("sweet", "fresh", "juicy", "ripe", "sour"),
    ),
    "vehicle": (
        ("car", "bus", "bicycle", "train", "boat", "truck", "scooter", "plane"),
        ("fast", "loud", "useful", "heavy", "modern"),
    ),
    "tool": (
        ("hammer", "knife", "shovel", "ladder", "needle", "saw", "wrench", "broom"),
        ("useful", "sharp", "simple", "heavy", "old"),
    ),
    "building": (
        ("house", "castle", "tower", "barn", "library", "school", "bridge", "temple"),
        ("tall", "old", "large", "quiet", "beautiful"),
    ),
    "plant": (
        ("tree", "flower", "cactus", "fern", "rose", "tulip", "bamboo", "moss"),
        ("green", "tall", "pretty", "tough", "fragrant"),
    ),
}

# Sentence frames for "describe"; most-likely-first.
# {a_obj} / {a_adj} = the word with its article ("an owl", "a quiet").
DESCRIBE_FRAMES = (
    "The {obj} is {adj}.",
    "{A_obj} is usually {adj}.",
    "It is {a_adj} {obj}.",
)
DESCRIBE_ASKS = (
    "Describe {a_obj} in one sentence.",
    "Say something about {a_obj}.",
    "Write a short sentence about {a_obj}.",
    "Tell me what {a_obj} is like.",
    "Describe {a_obj} briefly.",
    "What is {a_obj} like?",
)

# Categories for "list" tasks: items most-likely-first (5 each keeps references ≤ 20).
LIST_CATEGORIES: dict[str, tuple[str, ...]] = {
    "colors": ("red", "blue", "green", "yellow", "purple"),
    "fruits": ("apple", "banana", "orange", "grape", "cherry"),
    "animals": ("dog", "cat", "horse", "cow", "lion"),
    "drinks": ("water", "tea", "coffee", "milk", "juice"),
    "metals": ("iron", "gold", "silver", "copper", "tin"),
    "sports": ("football", "tennis", "swimming", "running", "chess"),
    "instruments": ("piano", "guitar", "violin", "drum", "flute"),
    "seasons": ("summer", "winter", "spring", "autumn", "fall"),
    "shapes": ("circle", "square", "triangle", "star", "oval"),
    "planets": ("Mars", "Earth", "Venus", "Jupiter", "Saturn"),
}
LIST_ASKS = ("Name {n} {cat}.", "List {n} {cat}.", "Give me {n} {cat}.", "Tell me {n} {cat}.")

# Paraphrase templates: {slot} = a synonym set (most-likely-first) the answer may vary over,
# <name>/<place>/<thing> = a variable the answer must copy unchanged.
PARAPHRASE_TEMPLATES: tuple[tuple[str, dict[str, tuple[str, ...]]], ...] = (
    (
        "The {meeting} {starts} at {noon} in <place>.",
        {
            "meeting": ("meeting", "session", "talk"),
            "starts": ("starts", "begins", "opens"),
            "noon": ("noon", "midday"),
        },
    ),
    (
        "<name> {bought} a {new} <thing> {yesterday}.",
        {
            "bought": ("bought", "purchased", "got"),
            "new": ("new", "fresh"),
            "yesterday": ("yesterday", "last night", "this morning"),
        },
    ),
    (
        "<name> is {happy} to {visit} <place>.",
        {
            "happy": ("happy", "glad", "excited"),
            "visit": ("visit", "see", "travel to"),
        },
    ),
    (
        "It is {very} {cold} in <place> {today}.",
        {
            "very": ("very", "quite", "really"),
            "cold": ("cold", "chilly"),
            "today": ("today", "this week"),
        },
    ),
)
PARAPHRASE_ASKS = ("Paraphrase this sentence.", "Rewrite this sentence in other words.")

WORDS = (
    "river", "stone", "cloud", "garden", "window", "candle", "forest", "silver", "planet",
    "mirror", "pocket", "thunder", "basket", "rocket", "winter", "orange", "pencil", "bridge",
    "island", "marble", "lantern", "meadow", "harbor", "violet", "copper", "shadow", "feather",
    "kettle", "blanket", "compass", "saddle", "tunnel", "puzzle", "velvet", "glacier", "jungle",
    "orchard", "canyon", "blossom", "pebble", "anchor", "falcon", "trumpet", "cabinet", "walnut",
    "ribbon", "desert", "journey", "ladder", "monster", "noodle", "oyster", "quartz", "riddle",
    "sponge", "tractor", "umbrella", "volcano", "wizard", "yogurt", "zipper", "biscuit", "dolphin",
)  # fmt: skip
SMALL_ADJS = ("red", "blue", "quiet", "bright", "small", "old", "green", "happy", "cold", "soft")
