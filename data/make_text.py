#!/usr/bin/env python3
"""Generate qscore's bundled text: small, original, offline stand-ins for WikiText-2 and UltraChat.

Everything here is written for this project: a made-up world (towns, rivers, ships, scientists,
compounds, clubs, mountains, species, novels, railways) described by sentence templates, and
UltraChat-like conversations (recipes, arithmetic, Python, travel, gardening, writing, advice,
summaries) built the same way. No text is copied from any corpus.

Deterministic: fixed seeds, the standard library only, no iteration over sets or hash()-ordered
containers, so the same Python gives byte-identical files. Regenerate with

    python data/make_text.py            # writes the four files next to this script
    python data/make_text.py --check    # regenerates in memory and fails if the files differ

Files:
  wiki_mini.txt   WikiText-like paragraphs, one text per line (with headings and blank lines)
  chat_mini.jsonl UltraChat-like {"messages": [...]} rows (evaluation)
  calib_mini.jsonl same format, disjoint subjects and seed (quantization calibration)
  train_mini.txt  more encyclopedic paragraphs, disjoint from wiki_mini (trains the tiny model)

Evaluation and training material draw their *subjects* from disjoint halves of each vocabulary
(by a CRC of the name), and no line of an evaluation file appears in a training file.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

SEEDS = {"wiki": 1101, "train": 2202, "chat": 3303, "calib": 4404}
N_WIKI, N_TRAIN, N_CHAT, N_CALIB = 150, 600, 120, 128

# --------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------
ONSETS = [
    "Ash", "Bel", "Bram", "Cal", "Cor", "Dun", "Ed", "El", "Fal", "Fen", "Gar", "Gil", "Hal", "Har",
    "Ings", "Kel", "Kin", "Lan", "Lor", "Mar", "Mel", "Nor", "Orm", "Os", "Pen", "Quen", "Ros",
    "Sal", "Sel", "Tam", "Tor", "Ul", "Ver", "Wen", "Wil", "Yar", "Brec", "Dal", "Hest", "Rav",
]
MIDS = ["", "", "", "", "a", "e", "in", "er", "ow", "en"]
TOWN_ENDS = [
    "ford", "wick", "ham", "by", "stead", "mouth", "bridge", "field", "holm", "ton", "dale",
    "worth", "bury", "haven", "combe", "ley", "thorpe", "minster",
]
RIVER_ENDS = ["e", "wy", "and", "ar", "ent", "ell", "isk", "ow", "ey", "ine", "un", "ath"]
REGION_ENDS = ["shire", "land", "mark", " Vale", "moor", "dene"]
SURNAME_ENDS = [
    "ton", "er", "well", "ley", "by", "son", "more", "hurst", "wood", "croft", "ridge", "ing",
    "ham", "cott", "wright", "field",
]
FIRST_F = [
    "Ada", "Agnes", "Alice", "Beatrice", "Clara", "Dora", "Edith", "Eleanor", "Flora", "Grace",
    "Harriet", "Ida", "Irene", "Joan", "Lena", "Lydia", "Margaret", "Mina", "Nora", "Olive",
    "Rosa", "Ruth", "Sylvia", "Vera", "Winifred",
]
FIRST_M = [
    "Albert", "Arthur", "Bernard", "Cedric", "Daniel", "Edmund", "Ernest", "Felix", "George",
    "Harold", "Isaac", "Jonas", "Leonard", "Martin", "Neville", "Oscar", "Percy", "Ralph",
    "Samuel", "Thomas", "Victor", "Walter", "Hugh", "Frederick", "Owen",
]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]
DIRECTIONS = ["north", "south", "east", "west", "north-east", "north-west", "south-east", "south-west"]
SAINTS = ["Andrew", "Bridget", "Michael", "Helen", "Oswald", "Margaret", "Peter", "Cuthbert", "Mary", "Lawrence"]
INDUSTRIES = [
    "wool", "linen", "paper", "brewing", "tanning", "shipbuilding", "glass", "pottery", "rope",
    "coal", "iron", "salt", "lace", "milling", "clock-making", "printing",
]
MODERN = [
    "retail", "light engineering", "logistics", "food processing", "education", "healthcare",
    "software", "financial services", "agriculture", "renewable energy",
]
SETTLE = ["fishing village", "river crossing", "monastic estate", "hill fort", "market hamlet", "farming settlement"]
COMPANIES_ENDS = ["Railway", "Junction Railway", "Valley Railway", "and Coast Railway"]
CLUB_ENDS = ["United", "Athletic", "Rovers", "Wanderers", "Town", "Albion", "Harriers", "Rangers"]
SPORTS = ["football", "rugby union", "cricket", "field hockey", "rugby league"]
GROUND_ENDS = ["Park", "Road", "Lane", "Meadow", "Stadium", "Green"]
COLOURS = ["red", "white", "blue", "green", "amber", "black", "claret", "navy", "yellow", "maroon", "sky blue", "orange"]
CUPS = ["County Cup", "Challenge Cup", "League Trophy", "Shield", "Northern Cup", "Founders' Cup"]
LEAGUES = ["Northern League", "Southern Counties League", "Premier Division", "First Division", "Regional League", "Combined Counties League"]
SHIP_TYPES = [
    "steam frigate", "cargo liner", "three-masted schooner", "destroyer", "whaling ship",
    "passenger ferry", "survey vessel", "light cruiser", "coastal steamer", "paddle steamer",
]
SHIP_PREFIX = ["HMS", "SS", "RMS", "MV", "PS"]
SHIP_NAMES = [
    "Resolute", "Kestrel", "Endeavour", "Morning Star", "Heron", "Valiant", "Northern Light",
    "Swift", "Perseverance", "Albatross", "Tern", "Constant", "Merlin", "Harvest Moon", "Osprey",
    "Gannet", "Steadfast", "Silver Birch", "Curlew", "Dauntless", "Brightwater", "Lapwing",
    "Intrepid", "Sea Holly", "Cormorant", "Petrel", "Clarion", "Fair Wind", "Garland", "Sentinel",
]
ENGINES = [
    "two triple-expansion steam engines", "a single diesel engine", "four steam turbines",
    "a compound steam engine", "two diesel-electric units", "sail and an auxiliary steam engine",
]
CARGOES = ["coal", "grain", "timber", "wool", "slate", "passengers and mail", "iron ore", "salt fish", "cotton", "china clay"]
SEAS = ["North Sea", "Atlantic", "Baltic", "Mediterranean", "Irish Sea", "English Channel", "Norwegian Sea"]
SHIP_ROLES = ["troop transport", "hospital ship", "minesweeper", "convoy escort", "depot ship", "training ship"]
FIELDS = [
    ("chemist", "chemistry"), ("astronomer", "astronomy"), ("botanist", "botany"),
    ("geologist", "geology"), ("mathematician", "mathematics"), ("physicist", "physics"),
    ("zoologist", "zoology"), ("engineer", "engineering"),
]
FINDINGS = {
    "chemistry": ["a new method for purifying sulfur compounds", "the structure of several coloured salts", "the rate of reactions in cold solutions"],
    "astronomy": ["a faint periodic comet", "the orbit of a double star", "variations in the brightness of red giants"],
    "botany": ["the flowering cycle of mountain grasses", "a new family of freshwater algae", "the spread of seeds by river floods"],
    "geology": ["the folding of coastal limestone", "the age of a volcanic plateau", "the movement of glaciers in the uplands"],
    "mathematics": ["a theorem on prime numbers in arithmetic progressions", "a method for solving cubic equations", "the geometry of curved surfaces"],
    "physics": ["the conduction of heat in thin wires", "the spectrum of heated gases", "the pressure of light on metal plates"],
    "zoology": ["the migration of eels", "the social behaviour of burrowing bees", "the breeding habits of seabirds"],
    "engineering": ["a stronger form of suspension bridge", "an efficient water turbine", "a safer design of boiler"],
}
PARENT_JOBS = ["schoolteacher", "miller", "clergyman", "shipwright", "farmer", "watchmaker", "doctor", "printer", "fisherman", "merchant"]
SOCIETIES = ["Royal Society", "Academy of Sciences", "Philosophical Society", "Geographical Society", "Institute of Natural History"]
APPEARANCE = ["colourless crystalline solid", "pale yellow liquid", "white powder", "dark red solid", "colourless oily liquid", "green crystalline solid", "faintly blue liquid"]
ODOURS = ["sweet", "sharp", "faint", "fruity", "pungent", "musty"]
SOLUBILITY = ["only slightly soluble", "insoluble", "moderately soluble", "very soluble"]
SOLVENTS = ["ethanol", "acetone", "diethyl ether", "chloroform", "hot benzene", "methanol"]
USES = [
    "a solvent in the paint industry", "an intermediate in the manufacture of dyes",
    "a flavouring agent", "a preservative for timber", "a reagent in analytical chemistry",
    "a starting material for plastics", "a corrosion inhibitor", "a component of photographic developers",
]
HAZARDS = ["irritation of the eyes and skin", "headaches and dizziness", "damage to the liver", "coughing and shortness of breath"]
STORAGE = ["nitrogen in dark glass bottles", "cool, dry conditions", "an inert atmosphere", "refrigeration away from light"]
CHEM_PREFIX = ["methyl", "ethyl", "propyl", "butyl", "dimethyl", "diethyl", "chloro", "bromo", "nitro", "amino", "hydroxy", "trimethyl"]
CHEM_STEMS = ["benz", "tolu", "pyr", "fur", "acet", "oxal", "naphth", "anil", "quinol", "malon", "succin", "glutar"]
CHEM_ENDS = ["oate", "amide", "ine", "ol", "one", "ate", "ide", "al"]
RANGES_ENDS = ["Hills", "Fells", "Mountains", "Range", "Highlands"]
MOUNT_FORMS = ["Mount {}", "{} Fell", "Ben {}", "{} Pike", "{} Crag", "{} Peak"]
ROCKS = ["granite", "slate", "sandstone", "basalt", "limestone", "gneiss", "schist", "gritstone"]
VEGETATION = ["heather and bracken", "pine forest", "birch woodland", "rough grassland", "oak woodland", "blanket bog"]
FLORA = ["mosses and lichens", "alpine flowers", "dwarf willow", "hardy grasses", "rare saxifrages"]
SPECIES_GROUPS = [
    ("beetle", "length", "wing cases"), ("moth", "wingspan", "forewing"), ("frog", "length", "back"),
    ("songbird", "wingspan", "crown"), ("freshwater snail", "shell height", "shell"),
    ("dragonfly", "wingspan", "abdomen"), ("lizard", "length", "flank"),
]
HABITATS = ["damp woodland", "chalk grassland", "upland streams", "coastal dunes", "reed beds", "old orchards", "peat bogs", "rocky hillsides"]
FOODS = ["small insects", "decaying wood", "algae", "seeds and berries", "nectar", "snails and worms", "leaf litter", "aphids"]
STATUSES = ["near threatened", "vulnerable", "of least concern", "endangered"]
THREATS = ["the drainage of wetlands", "the loss of old woodland", "intensive farming", "the spread of invasive plants", "river pollution"]
PATTERNS = ["two pale bands", "fine black spots", "a narrow silver stripe", "a row of orange dots", "faint grey streaks"]
BOOK_ADJ = ["Silent", "Last", "Hollow", "Winter", "Golden", "Distant", "Broken", "Quiet", "Salt", "Crooked", "Lantern", "Iron"]
BOOK_NOUNS = ["Harbour", "Orchard", "Lighthouse", "Road", "Garden", "Tide", "Mill", "Ferry", "House", "Bell", "Field", "Station"]
JOBS = ["lighthouse keeper", "schoolteacher", "ferry pilot", "young doctor", "clockmaker", "widowed farmer", "surveyor", "ship's cook", "bookseller", "railway clerk"]
PLOTS = [
    "returns to the village where {he} grew up after a long absence",
    "tries to save a failing family business during a hard winter",
    "discovers a bundle of letters hidden beneath the floor of an old house",
    "travels along the coast in search of a missing brother",
    "is caught between two rival families in a small market town",
    "keeps a diary through the year in which the river flooded",
]
PRAISE = ["careful prose", "vivid descriptions of the coast", "sharp dialogue", "sense of place", "quiet humour", "memorable characters"]
ENDINGS = ["rushed", "too neat", "unconvincing", "abrupt", "sentimental"]
PRIZES = ["Harwell", "Meridian", "Northern Book", "Lantern", "Kestrel"]
MEDIA = ["radio", "television", "the stage", "film"]
TRAILS = ["cycle", "walking", "bridle", "nature"]
PUBLISHERS_ENDS = ["Press", "and Sons", "Books", "House"]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def crc(s: str) -> int:
    return zlib.crc32(s.encode("utf-8"))


def in_part(name: str, part: str) -> bool:
    """Evaluation subjects are the names whose CRC is 0 mod 4; training subjects the rest."""
    return (crc(name) % 4 == 0) == (part == "eval")


def fmt_int(n: int) -> str:
    return f"{n:,}"


def join_list(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        suf = "th"
    else:
        suf = {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suf}"


ORD_WORDS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]


def century(year: int) -> str:
    return ordinal(year // 100 + 1)


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def lower_first(s: str) -> str:
    if len(s) > 1 and s[1].islower():
        return s[:1].lower() + s[1:]
    return s


class Gen:
    """Random choices plus name makers, tied to one seed and one half of the vocabulary."""

    def __init__(self, seed: int, part: str):
        self.r = random.Random(seed)
        self.part = part

    # generic -----------------------------------------------------------------------------
    def pick(self, seq):
        return seq[self.r.randrange(len(seq))]

    def sample(self, seq, k):
        return self.r.sample(list(seq), k)

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def date(self, year: int) -> str:
        return f"{self.r.randint(1, 28)} {self.pick(MONTHS)} {year}"

    def subject(self, make):
        """Draw names until one falls in this generator's half."""
        for _ in range(1000):
            name = make()
            if in_part(name, self.part):
                return name
        raise RuntimeError("no subject name in partition")

    # names -------------------------------------------------------------------------------
    def stem(self) -> str:
        return self.pick(ONSETS) + self.pick(MIDS)

    def town(self) -> str:
        s = self.stem() + self.pick(TOWN_ENDS)
        return s[0] + s[1:].lower()

    def river(self) -> str:
        return self.pick(ONSETS) + self.pick(RIVER_ENDS)

    def region(self) -> str:
        return self.pick(ONSETS) + self.pick(REGION_ENDS)

    def surname(self) -> str:
        s = self.stem() + self.pick(SURNAME_ENDS)
        return s[0] + s[1:].lower()

    def person(self, female: bool | None = None) -> tuple[str, bool]:
        if female is None:
            female = self.chance(0.5)
        first = self.pick(FIRST_F if female else FIRST_M)
        return f"{first} {self.surname()}", female

    def name(self) -> str:
        return self.person()[0]

    def chemical(self) -> str:
        return self.pick(CHEM_PREFIX) + self.pick(CHEM_STEMS) + self.pick(CHEM_ENDS)


def take_sentences(g: Gen, first: list[str], rest: list[str], lo: int, hi: int) -> str:
    """The lead sentence(s), then others in their given order until a target word count."""
    target = int(g.r.triangular(lo, hi, (lo + hi) * 0.45))
    keep = [i for i in range(len(rest)) if g.chance(0.75)]
    out = list(first)
    words = sum(len(s.split()) for s in out)
    for i in keep:
        if words >= target:
            break
        out.append(rest[i])
        words += len(rest[i].split())
    return " ".join(out)


# --------------------------------------------------------------------------------------------
# Encyclopedic paragraphs: each returns (title, paragraph)
# --------------------------------------------------------------------------------------------
def wiki_town(g: Gen, lo, hi):
    name = g.subject(g.town)
    region, river, other = g.region(), g.river(), g.town()
    founded = g.r.randint(880, 1450)
    charter = founded + g.r.randint(40, 300)
    census = g.pick([1991, 2001, 2011, 2021])
    pop = g.r.randint(2400, 96000)
    ind = g.sample(INDUSTRIES, 2)
    rail = g.r.randint(1838, 1895)
    mod = g.sample(MODERN, 2)
    flood = g.r.randint(1850, 2012)
    first = [
        f"{name} is a market town in {region}, lying on the {g.pick(['north', 'south', 'east', 'west'])} "
        f"bank of the River {river} about {g.r.randint(4, 60)} kilometres {g.pick(DIRECTIONS)} of {other}."
    ]
    rest = [
        f"It had a population of {fmt_int(pop)} at the {census} census.",
        f"The settlement is first recorded in {founded} as a {g.pick(SETTLE)}, and it received a royal charter in {charter}.",
        f"During the {century(g.r.randint(1700, 1899))} century the town grew rapidly around its {ind[0]} and {ind[1]} industries.",
        f"The railway reached {name} in {rail}, when the {g.river()} {g.pick(COMPANIES_ENDS)} opened a station on its line from {g.town()} to {g.town()}.",
        f"The parish church of St {g.pick(SAINTS)} dates largely from the {century(g.r.randint(1150, 1499))} century and is the oldest surviving building in the town.",
        f"A weekly market has been held on {g.pick(['Mondays', 'Tuesdays', 'Wednesdays', 'Thursdays', 'Fridays', 'Saturdays'])} since {charter + g.r.randint(1, 30)}.",
        f"In {flood} a severe flood damaged {g.r.randint(12, 480)} houses near the river, and a new embankment was completed {g.r.randint(2, 9)} years later.",
        f"The local economy now depends mainly on {mod[0]}, {mod[1]} and tourism.",
        f"{name} is twinned with {g.town()} in {g.region()}.",
        f"The town's {g.pick(SPORTS)} club, {name} {g.pick(CLUB_ENDS)}, plays its home matches at {g.surname()} {g.pick(GROUND_ENDS)}.",
    ]
    return name, take_sentences(g, first, rest, lo, hi)


def wiki_river(g: Gen, lo, hi):
    name = g.subject(g.river)
    region = g.region()
    length = g.r.randint(18, 240)
    towns = [g.town() for _ in range(3)]
    nav_year = g.r.randint(1660, 1820)
    bridge_year = g.r.randint(1300, 1890)
    first = [
        f"The River {name} is a river in {region} that flows for {length} kilometres from its source on "
        f"{g.stem()}{g.pick(['moor', ' Moss', ' Common', ' Edge'])} to its mouth at {g.pick([g.town(), 'the ' + g.river() + ' Estuary', g.stem() + ' Bay'])}."
    ]
    rest = [
        f"Its main tributaries are the {g.river()} and the {g.river()}.",
        f"The river passes through the towns of {join_list(towns)}.",
        f"It was made navigable as far as {towns[1]} in {nav_year}, and for most of the {century(nav_year + 40)} century barges carried {g.pick(CARGOES)} downstream.",
        f"The {g.surname()} Bridge at {towns[0]}, built in {bridge_year}, has {g.r.randint(3, 11)} stone arches and is still in use.",
        f"The river supports populations of {g.pick(['brown trout', 'salmon', 'grayling', 'pike', 'eels'])} and {g.pick(['otters', 'kingfishers', 'water voles', 'dippers'])}, and its lower reaches are protected as a nature reserve.",
        f"The highest recorded flow, {g.r.randint(60, 900)} cubic metres per second, was measured in {g.pick(MONTHS)} {g.r.randint(1900, 2015)}.",
        f"A reservoir built on its upper course in {g.r.randint(1880, 1975)} supplies drinking water to about {fmt_int(g.r.randint(20, 600) * 1000)} people.",
        f"The name {name} is thought to come from an old word meaning {g.pick(['clear water', 'swift', 'dark stream', 'boundary', 'winding'])}.",
    ]
    return "River " + name, take_sentences(g, first, rest, lo, hi)


def wiki_ship(g: Gen, lo, hi):
    name = g.subject(lambda: g.pick(SHIP_NAMES))
    prefix = g.pick(SHIP_PREFIX)
    stype = g.pick(SHIP_TYPES)
    builder = g.surname() + " " + g.pick(["and Company", "Brothers", "Shipbuilders", "Yard"])
    town = g.town()
    laid = g.r.randint(1840, 1960)
    launch = laid + 1
    fate_year = launch + g.r.randint(8, 45)
    fate = g.pick([
        "sold for scrap",
        f"wrecked on rocks off {g.stem()} Point",
        f"sunk in a collision with the steamer {g.pick(SHIP_NAMES)}",
        f"converted into a floating hotel at {g.town()}",
        "lost with all hands in a storm",
        "broken up after a fire in her engine room",
    ])
    first = [
        f"{prefix} {name} was a {stype} built by {builder} at {town} for the {g.surname()} {g.pick(['Line', 'Steam Packet Company', 'Navy', 'Shipping Company'])}."
    ]
    rest = [
        f"She was laid down in {g.pick(MONTHS)} {laid}, launched on {g.date(launch)} and completed the following year.",
        f"The ship measured {g.r.randint(30, 190)} metres in length and had a tonnage of {fmt_int(g.r.randint(300, 14000))} tons.",
        f"She was powered by {g.pick(ENGINES)}, giving a top speed of {g.r.randint(8, 32)} knots, and carried a crew of {g.r.randint(12, 420)}.",
        f"For her first {g.r.randint(2, 12)} years she carried {g.pick(CARGOES)} between {g.town()} and {g.town()}.",
        f"In {launch + g.r.randint(3, 20)} she was requisitioned as a {g.pick(SHIP_ROLES)} and served in the {g.pick(SEAS)}.",
        f"Her captain for much of this period was {g.name()}, who later wrote an account of her voyages.",
        f"She was {fate} in {fate_year}.",
        f"A model of the ship is displayed in the maritime museum at {town}.",
    ]
    return f"{prefix} {name}", take_sentences(g, first, rest, lo, hi)


def wiki_scientist(g: Gen, lo, hi):
    person, female = g.person()
    while not in_part(person, g.part):
        person, female = g.person()
    he, his, him = ("she", "her", "her") if female else ("he", "his", "him")
    job, field = g.pick(FIELDS)
    born = g.r.randint(1720, 1930)
    age = g.r.randint(45, 94)
    died = born + age
    town = g.town()
    pub = born + g.r.randint(24, 40)
    surname = person.split()[1]
    found = g.sample(FINDINGS[field], 2)
    honour = g.pick([f"crater {surname}", f"mineral {surname.lower()}ite", f"{surname} Lecture Hall", f"{surname} Prize", f"{surname} Glacier"])
    first = [
        f"{person} ({born} – {died}) was {'an' if job[0] in 'aeiou' else 'a'} {job} from {g.region()} known for {his} work on {found[0]}."
    ]
    rest = [
        f"Born in {town}, {he} was the {g.pick(ORD_WORDS[:6])} child of a {g.pick(PARENT_JOBS)}.",
        f"{cap(he)} studied {field} at the University of {g.town()}, graduating in {born + g.r.randint(19, 24)}, and later worked under {g.name()}.",
        f"In {pub} {he} published a paper that described {found[1]}, which brought {him} wide attention.",
        f"{cap(he)} was elected a fellow of the {g.pick(SOCIETIES)} in {pub + g.r.randint(2, 12)} and received its gold medal {g.r.randint(3, 15)} years later.",
        f"{cap(he)} taught at {g.town()} for {g.r.randint(5, 30)} years, and {his} students included {g.name()} and {g.name()}.",
        f"{cap(he)} died at {g.town()} on {g.date(died)}, aged {age}.",
        f"The {honour} is named after {him}.",
    ]
    return person, take_sentences(g, first, rest, lo, hi)


ATOMIC = {"C": 12.011, "H": 1.008, "N": 14.007, "O": 15.999}


def wiki_compound(g: Gen, lo, hi):
    name = g.subject(g.chemical)
    c, n, o = g.r.randint(2, 14), g.r.randint(0, 3), g.r.randint(0, 4)
    h = g.r.randint(max(2, c - 2), 2 * c + 2 + n)
    formula = f"C{c}H{h}" + (f"N{n}" if n > 1 else "N" if n == 1 else "") + (f"O{o}" if o > 1 else "O" if o == 1 else "")
    mass = c * ATOMIC["C"] + h * ATOMIC["H"] + n * ATOMIC["N"] + o * ATOMIC["O"]
    mp = g.r.randint(-90, 240)
    bp = mp + g.r.randint(40, 220)
    year = g.r.randint(1810, 1960)
    first = [f"{cap(name)} is an organic compound with the formula {formula} and a molar mass of {mass:.2f} g/mol."]
    rest = [
        f"At room temperature it is a {g.pick(APPEARANCE)} with a {g.pick(ODOURS)} odour.",
        f"It melts at {mp} °C and boils at {bp} °C.",
        f"It is {g.pick(SOLUBILITY)} in water but dissolves readily in {g.pick(SOLVENTS)}.",
        f"The compound was first prepared in {year} by the chemist {g.name()}, who obtained it by heating {g.chemical()} with {g.chemical()}.",
        f"It is used mainly as {g.pick(USES)}, and about {fmt_int(g.r.randint(2, 900) * 100)} tonnes are produced each year.",
        f"Exposure can cause {g.pick(HAZARDS)}, so it is usually stored under {g.pick(STORAGE)}.",
        f"Its structure was confirmed by X-ray crystallography in {g.r.randint(max(year + 5, 1920), 1990)}.",
    ]
    return cap(name), take_sentences(g, first, rest, lo, hi)


def wiki_club(g: Gen, lo, hi):
    name = g.subject(lambda: f"{g.town()} {g.pick(CLUB_ENDS)}")
    town = name.rsplit(" ", 1)[0]
    sport = g.pick(SPORTS)
    founded = g.r.randint(1860, 1960)
    rival = f"{g.town()} {g.pick(CLUB_ENDS)}"
    cup_year = founded + g.r.randint(10, 60)
    c1, c2 = g.sample(COLOURS, 2)
    first = [f"{name} is a {sport} club based in {town}, {g.region()}."]
    rest = [
        f"Founded in {founded} by {g.pick(['workers at a local mill', 'members of a church youth group', 'former pupils of the grammar school', 'railway employees', 'a group of fishermen'])}, the club plays its home matches at {g.surname()} {g.pick(GROUND_ENDS)}, which holds {fmt_int(g.r.randint(8, 160) * 100)} spectators.",
        f"The team currently competes in the {g.pick(LEAGUES)}.",
        f"Its traditional colours are {c1} and {c2}.",
        f"The club's greatest success came in {cup_year}, when it won the {g.pick(CUPS)} after beating {g.town()} {g.pick(CLUB_ENDS)} {g.r.randint(1, 5)}–{g.r.randint(0, 2)} in the final.",
        f"Its fiercest rivals are {rival}, and matches between the two sides are known as the {g.pick(['River', 'Valley', 'Coast', 'County', 'Moorland'])} derby.",
        f"The record attendance of {fmt_int(g.r.randint(30, 240) * 100)} was set against {g.town()} {g.pick(CLUB_ENDS)} in {cup_year + g.r.randint(-8, 20)}.",
        f"{g.name()} holds the record for most appearances, with {g.r.randint(250, 640)} between {cup_year - 5} and {cup_year + g.r.randint(8, 16)}.",
    ]
    return name, take_sentences(g, first, rest, lo, hi)


def wiki_mountain(g: Gen, lo, hi):
    name = g.subject(lambda: g.pick(MOUNT_FORMS).format(g.pick(ONSETS) + g.pick(["", "", "an", "ock", "ow", "ith"])))
    mrange = f"{g.stem()} {g.pick(RANGES_ENDS)}"
    height = g.r.randint(420, 1340)
    r1, r2 = g.sample(ROCKS, 2)
    ascent = g.r.randint(1780, 1905)
    first = [f"{name} is a mountain in the {mrange}, rising to a height of {fmt_int(height)} metres above sea level."]
    rest = [
        f"It is the {g.pick(ORD_WORDS[:8])} highest summit in {g.region()}.",
        f"The mountain is composed mainly of {r1}, with bands of {r2} exposed on its {g.pick(['north', 'south', 'east', 'west'])} face.",
        f"The first recorded ascent was made by {g.name()} in {ascent}.",
        f"The usual route starts from the village of {g.town()} and takes about {g.r.randint(2, 7)} hours.",
        f"Its lower slopes are covered in {g.pick(VEGETATION)}, while the summit plateau supports {g.pick(FLORA)}.",
        f"A weather station operated on the summit from {ascent + g.r.randint(20, 60)} to {ascent + g.r.randint(70, 110)}.",
        f"On clear days the view from the top reaches as far as the {g.stem()} {g.pick(RANGES_ENDS)}, {g.r.randint(40, 160)} kilometres away.",
    ]
    return name, take_sentences(g, first, rest, lo, hi)


def wiki_species(g: Gen, lo, hi):
    name = g.subject(lambda: f"{g.pick(ONSETS)}{g.pick(['aria', 'ella', 'opsis', 'ides', 'ura', 'inus'])} {(g.surname() + 'i').lower()}")
    genus, epithet = name.split()
    group, measure, part = g.pick(SPECIES_GROUPS)
    family = g.pick(ONSETS) + "idae"
    described = g.r.randint(1758, 1960)
    m1 = g.pick(MONTHS[2:8])
    m2 = MONTHS[MONTHS.index(m1) + g.r.randint(1, 4)]
    k = g.r.randint(2, 12)
    first = [f"{name} is a species of {group} in the family {family}."]
    rest = [
        f"It was first described by {g.name()} in {described} from specimens collected near {g.town()}.",
        f"Adults reach a {measure} of {g.r.randint(4, 90)} millimetres, and the {part} is {g.pick(['brown', 'olive', 'grey', 'black', 'copper', 'pale green'])} with {g.pick(PATTERNS)}.",
        f"The species is found in {g.pick(HABITATS)} across {g.region()} and {g.region()}.",
        f"It feeds mainly on {g.pick(FOODS)}.",
        f"Breeding takes place between {m1} and {m2}, and the female lays {k} to {k + g.r.randint(2, 10)} eggs.",
        f"The species is listed as {g.pick(STATUSES)} because of {g.pick(THREATS)}.",
        f"The name {epithet} honours the collector {g.name()}.",
    ]
    return name, take_sentences(g, first, rest, lo, hi)


def wiki_novel(g: Gen, lo, hi):
    title = g.subject(lambda: f"The {g.pick(BOOK_ADJ)} {g.pick(BOOK_NOUNS)}")
    author, female = g.person()
    year = g.r.randint(1850, 2010)
    hero_f = g.chance(0.5)
    hero = g.pick(FIRST_F if hero_f else FIRST_M)
    plot = g.pick(PLOTS).format(he="she" if hero_f else "he")
    article = "an" if str(year).startswith(("18", "8", "11")) else "a"
    first = [f"{title} is {article} {year} novel by {author}."]
    rest = [
        f"It was published by {g.surname()} {g.pick(PUBLISHERS_ENDS)} in {g.town()} and was the author's {g.pick(ORD_WORDS[:6])} book.",
        f"The story follows {hero}, a {g.pick(JOBS)} who {plot}.",
        f"Critics praised its {g.pick(PRAISE)} but found the ending {g.pick(ENDINGS)}.",
        f"The novel sold {fmt_int(g.r.randint(3, 400) * 1000)} copies in its first year and was adapted for {g.pick(MEDIA)} in {year + g.r.randint(2, 30)}.",
        f"It won the {g.pick(PRIZES)} Prize in {year + 1}.",
        f"{author.split()[0]} later said that the book was inspired by {g.pick(['a summer spent on the coast', 'stories told by a grandmother', 'a newspaper report', 'a walk along an old canal'])}.",
    ]
    return title, take_sentences(g, first, rest, lo, hi)


def wiki_railway(g: Gen, lo, hi):
    name = g.subject(lambda: f"{g.town()} and {g.town()} Railway")
    t1, t2 = name[: -len(" Railway")].split(" and ")
    act = g.r.randint(1830, 1890)
    opened = act + g.r.randint(1, 6)
    closed = g.r.randint(max(opened + 30, 1930), 1975)
    first = [f"The {name} was a railway line in {g.region()} that ran for {g.r.randint(6, 70)} kilometres between {t1} and {t2}."]
    rest = [
        f"It was authorised by an act in {act}, and the first section opened on {g.date(opened)}.",
        f"Intermediate stations included {join_list([g.town() for _ in range(3)])}.",
        f"Traffic consisted mainly of {g.pick(CARGOES)}, with {g.r.randint(2, 14)} passenger trains each way on weekdays.",
        f"The engineer was {g.name()}, who also designed the {g.r.randint(5, 30)}-arch viaduct over the River {g.river()}.",
        f"The line closed to passengers in {closed} and to goods in {closed + g.r.randint(1, 12)}.",
        f"Part of the track bed is now a {g.pick(TRAILS)} path.",
    ]
    return "The " + name, take_sentences(g, first, rest, lo, hi)


WIKI_KINDS = [wiki_town, wiki_river, wiki_ship, wiki_scientist, wiki_compound, wiki_club,
              wiki_mountain, wiki_species, wiki_novel, wiki_railway]


def wiki_lines(seed: int, part: str, n: int, forbidden: list[str]) -> list[str]:
    """n lines: paragraphs (40-200 words), a few '= Title =' headings (short), a few blanks."""
    g = Gen(seed, part)
    avoid = dict.fromkeys(forbidden)
    lines: list[str] = []
    seen: dict[str, None] = {}
    while len(lines) < n:
        kind = g.pick(WIKI_KINDS)
        title, para = kind(g, 40, 200)
        if para in avoid or para in seen:
            continue
        seen[para] = None
        block = []
        if g.chance(0.12):
            heading = f"= {title} ="
            if heading not in avoid and heading not in seen:
                seen[heading] = None
                block.append(heading)
                if g.chance(0.5):
                    block.append("")
        block.append(para)
        if g.chance(0.04):
            block.append("")
        lines.extend(block)
    return lines[:n]


# --------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------
DISHES = [
    ("lentil soup", "soup"), ("leek and potato soup", "soup"), ("tomato soup", "soup"),
    ("carrot and ginger soup", "soup"), ("pea soup", "soup"), ("mushroom soup", "soup"),
    ("banana bread", "bake"), ("oat biscuits", "bake"), ("apple crumble", "bake"),
    ("lemon cake", "bake"), ("cheese scones", "bake"), ("ginger loaf", "bake"),
    ("chickpea curry", "stew"), ("beef stew", "stew"), ("vegetable chilli", "stew"),
    ("chicken casserole", "stew"), ("bean goulash", "stew"), ("fish pie", "bake"),
    ("pasta with pesto", "pasta"), ("spaghetti with tomato sauce", "pasta"),
    ("macaroni cheese", "pasta"), ("pasta with roasted vegetables", "pasta"),
    ("potato salad", "salad"), ("lentil salad", "salad"), ("cucumber salad", "salad"),
    ("rice salad", "salad"), ("coleslaw", "salad"), ("bean salad", "salad"),
]
DISH_INGR = {
    "soup": ["an onion", "two cloves of garlic", "a litre of vegetable stock", "a tablespoon of olive oil", "salt and pepper", "a bay leaf", "a handful of parsley"],
    "bake": ["200 g of plain flour", "100 g of butter", "two eggs", "80 g of sugar", "a teaspoon of baking powder", "a pinch of salt", "100 ml of milk"],
    "stew": ["an onion", "two carrots", "a tin of chopped tomatoes", "a teaspoon of cumin", "400 ml of stock", "two cloves of garlic", "a tablespoon of oil"],
    "pasta": ["300 g of dried pasta", "a tablespoon of olive oil", "two cloves of garlic", "50 g of grated cheese", "a handful of basil", "salt and pepper"],
    "salad": ["a tablespoon of lemon juice", "two tablespoons of olive oil", "a small red onion", "a handful of fresh herbs", "salt and pepper", "a teaspoon of mustard"],
}
DISH_STEPS = {
    "soup": [
        "Chop the onion and garlic and soften them in the oil over a low heat for about {m} minutes.",
        "Add the main ingredients for the {dish} and stir for a minute or two.",
        "Pour in the stock, add the bay leaf and bring everything to the boil.",
        "Lower the heat and simmer for {m2} minutes, until everything is tender.",
        "Remove the bay leaf, blend the soup until smooth and season to taste.",
    ],
    "bake": [
        "Heat the oven to {t} °C and line a tin with baking paper.",
        "Rub the butter into the flour until the mixture looks like breadcrumbs.",
        "Stir in the sugar, then beat in the eggs and the milk to make a soft mixture.",
        "Spoon it into the tin and bake for {m2} minutes, until golden and firm.",
        "Leave to cool for {m} minutes before serving.",
    ],
    "stew": [
        "Fry the onion, carrots and garlic in the oil for {m} minutes.",
        "Stir in the cumin and cook for another minute.",
        "Add the main ingredients for the {dish}, the tomatoes and the stock.",
        "Cover and simmer gently for {m2} minutes, stirring now and then.",
        "Check the seasoning and serve hot.",
    ],
    "pasta": [
        "Cook the pasta in plenty of salted boiling water for about {m} minutes.",
        "While it cooks, warm the oil and garlic gently in a large pan.",
        "Drain the pasta, keeping a cup of the cooking water.",
        "Toss the pasta with the sauce, adding a little of the water if it looks dry.",
        "Serve with the cheese and basil on top.",
    ],
    "salad": [
        "Whisk the lemon juice, oil and mustard together to make a dressing.",
        "Slice the onion very thinly and leave it in the dressing for {m} minutes.",
        "Prepare the main ingredients for the {dish} and put them in a large bowl.",
        "Pour over the dressing and toss gently.",
        "Scatter the herbs on top and serve within {m2} minutes.",
    ],
}
PLANTS = [
    "tomatoes", "runner beans", "carrots", "lettuce", "courgettes", "sweet peas", "strawberries",
    "garlic", "onions", "spinach", "sunflowers", "basil", "potatoes", "radishes", "peas",
    "beetroot", "kale", "leeks", "parsnips", "chillies", "cucumbers", "lavender", "rhubarb", "broad beans",
]
TASKS = [
    ("reverse a string", "text", "reversed_text = {v}[::-1]\nprint(reversed_text)",
     "The slice [::-1] walks through the string from the end to the start, one character at a time, and builds a new string."),
    ("find the largest number in a list", "numbers", "largest = max({v})\nprint(largest)",
     "The built-in max function looks at every item once and returns the biggest one. It raises a ValueError if the list is empty."),
    ("remove duplicates from a list but keep the order", "items", "unique = list(dict.fromkeys({v}))\nprint(unique)",
     "A dictionary keeps its keys in the order they were first inserted, so dict.fromkeys drops repeats while keeping the first occurrence of each item."),
    ("count how often each word appears in a sentence", "sentence", "from collections import Counter\n\ncounts = Counter({v}.lower().split())\nprint(counts.most_common(3))",
     "The split method breaks the sentence into words, lower makes the count ignore capital letters, and Counter tallies each word."),
    ("check whether a number is prime", "n", "def is_prime({v}):\n    if {v} < 2:\n        return False\n    i = 2\n    while i * i <= {v}:\n        if {v} % i == 0:\n            return False\n        i += 1\n    return True",
     "The loop only needs to test divisors up to the square root, because any larger factor would pair with a smaller one that was already checked."),
    ("sum the numbers in a text file with one number per line", "path", "total = 0\nwith open({v}) as f:\n    for line in f:\n        if line.strip():\n            total += float(line)\nprint(total)",
     "The with block closes the file for you, the strip check skips blank lines, and float turns each line into a number before it is added."),
    ("sort a list of names alphabetically", "names", "sorted_names = sorted({v}, key=str.lower)\nprint(sorted_names)",
     "The sorted function returns a new list, and key=str.lower makes the comparison ignore the difference between capital and small letters."),
    ("join a list of words into one string with commas", "words", "line = ', '.join({v})\nprint(line)",
     "The join method is called on the separator and glues every item of the list together, so the items must all be strings."),
    ("get today's date as text", "fmt", "from datetime import date\n\nprint(date.today().strftime({v}))",
     "date.today gives the current date and strftime formats it using codes such as %Y for the year and %d for the day."),
    ("turn a list of numbers into their squares", "values", "squares = [x * x for x in {v}]\nprint(squares)",
     "This is a list comprehension: it runs the expression x * x for every x in the list and collects the results."),
]
VARS = {
    "text": ["text", "word", "message", "s", "name"], "numbers": ["numbers", "scores", "values", "data"],
    "items": ["items", "colors", "tags", "ids"], "sentence": ["sentence", "line", "text", "review"],
    "n": ["n", "number", "x", "value"], "path": ["'numbers.txt'", "'data.txt'", "'prices.txt'", "'readings.txt'"],
    "names": ["names", "people", "guests", "players"], "words": ["words", "parts", "fruits", "cities"],
    "fmt": ["'%Y-%m-%d'", "'%d/%m/%Y'", "'%A %d %B'"], "values": ["values", "numbers", "sizes", "lengths"],
}
ADVICE = {
    "sleeping better": ["Go to bed and get up at the same time every day, including weekends.", "Keep screens out of the bedroom for the last hour before sleep.", "Avoid coffee and tea after the middle of the afternoon.", "Keep the room cool, dark and quiet.", "Get some daylight in the morning, even a short walk helps.", "If you cannot sleep after twenty minutes, get up and read until you feel tired."],
    "learning a new language": ["Practise a little every day rather than a lot once a week.", "Learn the most common words first, they cover most of everyday speech.", "Listen to simple podcasts or radio while you do other things.", "Find a conversation partner and speak from the first week.", "Write short diary entries in the language.", "Review old words with flash cards so they move into long-term memory."],
    "running my first 5 km race": ["Build up slowly, adding no more than a few minutes each week.", "Run three times a week with a rest day in between.", "Mix running with walking at the start, then shorten the walking breaks.", "Buy shoes that fit well and feel comfortable from the first step.", "Do one easy run at race distance a week before the event.", "Start the race slower than you think you need to."],
    "saving money each month": ["Write down everything you spend for one month to see where the money goes.", "Move a fixed amount to savings on the day you are paid.", "Cancel subscriptions you have not used in the last month.", "Plan meals for the week and shop with a list.", "Wait two days before any purchase that is not essential.", "Compare prices for insurance and energy once a year."],
    "studying for exams": ["Make a timetable that covers every topic before the exam.", "Study in blocks of about forty minutes with short breaks.", "Test yourself with past papers instead of only rereading notes.", "Explain each topic out loud as if you were teaching it.", "Sleep well the night before, tired brains remember less.", "Start with the topics you find hardest while you are fresh."],
    "keeping houseplants alive": ["Check the label and put each plant where it gets the right amount of light.", "Water only when the top few centimetres of soil feel dry.", "Use pots with drainage holes so the roots never sit in water.", "Feed the plants lightly in spring and summer.", "Wipe dust off the leaves so they can use the light.", "Repot when roots start to grow out of the bottom of the pot."],
    "working from home": ["Keep a separate place where you only work.", "Start and finish at fixed times.", "Take a proper lunch break away from the screen.", "Write a short list of the three most important tasks each morning.", "Get outside for a walk during the day.", "Turn off notifications while you are concentrating."],
    "public speaking": ["Know your opening lines by heart so the start feels easy.", "Practise out loud several times, ideally in front of a friend.", "Speak more slowly than feels natural.", "Use short notes instead of a full script.", "Look at different people in the room as you speak.", "Pause instead of saying um, a silence feels shorter to the audience than to you."],
    "cooking on a budget": ["Plan your meals around what is cheap that week.", "Cook large batches and freeze portions.", "Buy dried beans, lentils and rice in bulk.", "Use leftovers for soups and stir-fries.", "Choose seasonal vegetables.", "Buy the shop's own brand for basics."],
    "drinking more water": ["Keep a full bottle on your desk.", "Drink a glass with every meal.", "Add slices of lemon or cucumber for flavour.", "Set a reminder on your phone every two hours.", "Eat fruit and vegetables with high water content.", "Drink a glass as soon as you wake up."],
}
POEM_SUBJECTS = [
    "the sea in winter", "an old oak tree", "the first snow", "a quiet library", "a harbour at dawn",
    "autumn leaves", "a city at night", "a summer storm", "a mountain lake", "a railway station",
    "the moon over the fields", "a garden after rain", "a lighthouse", "a busy market", "the last day of summer",
    "a frozen river", "a kitchen in the morning", "the wind on the moor",
]
POEM_WORDS = {
    "adj": ["quiet", "grey", "silver", "slow", "bright", "cold", "gentle", "restless", "golden", "pale"],
    "verb": ["waits", "turns", "breathes", "listens", "sleeps", "gathers", "shines", "drifts", "remembers", "calls"],
    "noun": ["light", "water", "stone", "wind", "sky", "shadow", "song", "morning", "silence", "road"],
}
EMAILS = [  # (to whom, what the user asks to say, the same in the letter, subject, greeting)
    ("my manager", "I need to leave early on Friday for a doctor's appointment", "I need to leave early on Friday for a doctor's appointment", "Leaving early on Friday", "Dear Ms Hale"),
    ("my landlord", "the kitchen tap has been leaking for a week", "the kitchen tap in the flat has been leaking for a week", "Leaking kitchen tap", "Dear Mr Orton"),
    ("a colleague", "I will be late with my part of the report", "I will be a few days late with my part of the report", "My part of the report", "Hi Dana"),
    ("my neighbour", "we are having a party on Saturday evening", "we are having a small party on Saturday evening", "Party on Saturday", "Dear neighbour"),
    ("my teacher", "I missed the last class because I was ill", "I missed the last class because I was ill", "Missed class", "Dear Mr Penrose"),
    ("a customer", "their order will arrive two days late", "your order will arrive two days later than planned", "Delay to your order", "Dear customer"),
    ("the school", "my son will be away next week for a family wedding", "my son will be away next week for a family wedding", "Absence next week", "Dear Head Teacher"),
    ("my team", "the meeting on Monday has moved to Tuesday", "our meeting on Monday has moved to Tuesday at the same time", "Meeting moved to Tuesday", "Hi all"),
    ("a hotel", "I would like to change my booking to one night later", "I would like to move my booking to one night later", "Change to my booking", "Dear reservations team"),
    ("my friend", "I cannot come to dinner next week", "I am not able to come to dinner next week after all", "Dinner next week", "Hi Jess"),
    ("the council", "the street light outside my house is broken", "the street light outside my house has stopped working", "Broken street light", "Dear Sir or Madam"),
    ("my bank", "there is a payment on my card that I do not recognise", "there is a payment on my card that I do not recognise", "Unknown card payment", "Dear customer services team"),
]
ATTRACTIONS = ["the old market hall", "the riverside walk", "the town museum", "the castle ruins", "the botanical garden", "the cathedral", "the harbour", "the covered bridge", "the art gallery", "the railway museum", "the town walls", "the hill above the town"]
FOOD_SPOTS = ["a small bakery near the square", "the fish restaurant by the harbour", "the Saturday food market", "a tea room in the old mill", "the café inside the museum"]

NAMES_FOR_SIG = ["Sam", "Alex", "Jo", "Chris", "Pat", "Robin", "Kim", "Lee", "Max", "Ash"]


class ChatGen(Gen):
    """Conversations; subjects (dishes, plants, tasks, ...) are split between eval and calib."""

    def subjects(self, seq, key=lambda x: x):
        return [x for x in seq if in_part(key(x), self.part)] or list(seq)

    def msgs(self, *pairs):
        out = []
        for u, a in pairs:
            out.append({"role": "user", "content": u})
            out.append({"role": "assistant", "content": a})
        return out

    def turns(self) -> int:
        return self.pick([1, 1, 2, 2, 2, 3])

    # topics ------------------------------------------------------------------------------
    def cooking(self):
        dish, cat = self.pick(self.subjects(DISHES, key=lambda d: d[0]))
        people = self.r.randint(2, 8)
        ask = self.pick([
            f"How do I make {dish} at home?",
            f"Can you give me a simple recipe for {dish}?",
            f"I want to cook {dish} for {people} people this weekend. Where should I start?",
            f"What is the easiest way to make {dish}? I'm not a confident cook.",
        ])
        ingr = self.sample(DISH_INGR[cat], self.r.randint(4, len(DISH_INGR[cat])))
        m, m2, t = self.r.randint(5, 15), self.r.randint(15, 50), self.pick([160, 170, 180, 190, 200])
        steps = [s.format(dish=dish, m=m, m2=m2, t=t) for s in DISH_STEPS[cat]]
        ans = (f"Here is a simple way to make {dish} for about {people} people.\n\nIngredients:\n"
               + "\n".join(f"- {i}" for i in ingr)
               + "\n\nMethod:\n" + "\n".join(f"{k}. {s}" for k, s in enumerate(steps, 1))
               + "\n\n" + self.pick([
                   f"The whole thing takes about {m + m2 + 10} minutes.",
                   "Taste as you go and adjust the seasoning at the end.",
                   "It is a forgiving recipe, so do not worry if your quantities are a little different.",
               ]))
        pairs = [(ask, ans)]
        follow = [
            ("Can I make it a day ahead?",
             f"Yes. {cap(dish)} keeps well in a covered container in the fridge for up to {self.r.randint(2, 4)} days. "
             "Reheat it gently, or bring it back to room temperature if it is served cold."),
            ("How can I make it vegetarian?",
             f"Most of this recipe already is. Use vegetable stock instead of meat stock, check that the cheese is made without animal rennet, "
             f"and if the {dish} normally contains meat or fish, replace it with {self.pick(['chickpeas', 'mushrooms', 'lentils', 'firm tofu'])}."),
            ("What should I serve with it?",
             f"{cap(dish)} goes well with {self.pick(['crusty bread', 'a green salad', 'steamed rice', 'roast potatoes'])} "
             f"and a simple side of {self.pick(['green beans', 'cucumber', 'tomatoes', 'steamed greens'])}."),
            ("Can I freeze the leftovers?",
             f"You can freeze it for up to {self.r.randint(2, 3)} months. Let it cool completely, pack it in portions and thaw it overnight in the fridge."),
        ]
        for q, a in self.sample(follow, self.turns() - 1):
            pairs.append((q, a))
        return self.msgs(*pairs)

    def maths(self):
        kind = self.r.randrange(5)
        if kind == 0:
            d, t = self.r.randint(2, 40) * 10, self.r.randint(2, 8)
            q = f"A train travels {d} km in {t} hours. What is its average speed?"
            a = (f"Average speed is distance divided by time.\n\n{d} km / {t} h = {d / t:.1f} km/h\n\n"
                 f"So the train's average speed is {d / t:.1f} kilometres per hour.")
            d2 = d + self.r.randint(1, 10) * 10
            f = (f"What if it travelled {d2} km in the same time?",
                 f"Then the speed is {d2} km / {t} h = {d2 / t:.1f} km/h, which is {d2 / t - d / t:.1f} km/h faster.")
        elif kind == 1:
            p, price = self.pick([10, 15, 20, 25, 30, 40]), self.r.randint(8, 120) * 5
            q = f"A coat costs {price} pounds and is reduced by {p}%. What is the new price?"
            cut = price * p / 100
            a = (f"First find {p}% of {price}: {price} x {p} / 100 = {cut:.2f}.\n\n"
                 f"Then subtract it: {price} - {cut:.2f} = {price - cut:.2f}.\n\nThe new price is {price - cut:.2f} pounds.")
            f = ("How much would two coats cost at the new price?",
                 f"Two coats cost 2 x {price - cut:.2f} = {2 * (price - cut):.2f} pounds.")
        elif kind == 2:
            w, h = self.r.randint(3, 25), self.r.randint(3, 25)
            q = f"My garden is {w} metres long and {h} metres wide. What is its area and how much fencing do I need to go all the way round?"
            a = (f"The area is length times width: {w} x {h} = {w * h} square metres.\n\n"
                 f"The fencing goes round the perimeter: 2 x ({w} + {h}) = {2 * (w + h)} metres.\n\n"
                 f"So the garden has an area of {w * h} m² and needs {2 * (w + h)} metres of fencing.")
            cost = self.r.randint(8, 30)
            f = (f"If fencing costs {cost} pounds per metre, what is the total cost?",
                 f"{2 * (w + h)} metres x {cost} pounds = {2 * (w + h) * cost} pounds in total.")
        elif kind == 3:
            pr, rate, yrs = self.r.randint(5, 60) * 100, self.pick([2, 3, 4, 5, 6]), self.r.randint(2, 10)
            q = f"If I put {pr} pounds in a savings account with {rate}% simple interest per year, how much will I have after {yrs} years?"
            intr = pr * rate * yrs / 100
            a = (f"Simple interest is principal x rate x time.\n\nInterest = {pr} x {rate}/100 x {yrs} = {intr:.2f} pounds.\n\n"
                 f"Total after {yrs} years = {pr} + {intr:.2f} = {pr + intr:.2f} pounds.")
            comp = pr * (1 + rate / 100) ** yrs
            f = ("And with compound interest?",
                 f"With yearly compounding the total is {pr} x (1 + {rate}/100)^{yrs} = {comp:.2f} pounds, "
                 f"which is {comp - pr - intr:.2f} pounds more than with simple interest.")
        else:
            km = self.r.randint(3, 90)
            q = f"How many miles is {km} kilometres?"
            a = (f"One kilometre is about 0.621 miles, so {km} km x 0.621 = {km * 0.621:.1f} miles.\n\n"
                 f"So {km} kilometres is roughly {km * 0.621:.1f} miles.")
            f = ("And how many metres is that?", f"{km} kilometres is {km} x 1000 = {fmt_int(km * 1000)} metres.")
        pairs = [(q, a)]
        if self.turns() > 1:
            pairs.append(f)
        return self.msgs(*pairs)

    def python(self):
        task, vkey, code, expl = self.pick(self.subjects(TASKS, key=lambda t: t[0]))
        v = self.pick(VARS[vkey])
        ask = self.pick([
            f"How do I {task} in Python?",
            f"What's the simplest way to {task} using Python?",
            f"I'm learning Python. Can you show me how to {task}?",
        ])
        ans = (f"Here is a short way to {task}:\n\n```python\n{code.format(v=v)}\n```\n\n{expl}")
        pairs = [(ask, ans)]
        follow = [
            ("Can you explain it line by line?",
             "Sure. " + expl + " Everything else in the snippet just stores the result and prints it so you can check it."),
            ("How would I test that it works?",
             f"Try it on a small example where you know the answer in advance, and compare. For example, call it with a short {vkey} value, "
             "print the result, and check it by hand. Once that works, you can move the check into a function and use assert so that it fails loudly if anything changes."),
            ("Is there a faster way for very large inputs?",
             "For most programs this version is fast enough, because the work grows in a straight line with the size of the input. "
             "If you really need more speed, measure first with the timeit module before changing anything."),
        ]
        for q, a in self.sample(follow, self.turns() - 1):
            pairs.append((q, a))
        return self.msgs(*pairs)

    def travel(self):
        town = self.subject(self.town)
        days = self.r.randint(2, 4)
        ask = self.pick([
            f"I'm spending {days} days in {town} next month. What should I see?",
            f"Can you suggest a {days}-day plan for a visit to {town}?",
        ])
        sights = self.sample(ATTRACTIONS, days * 2)
        plan = "\n".join(
            f"Day {d + 1}: start with {sights[2 * d]}, then spend the afternoon at {sights[2 * d + 1]}."
            for d in range(days))
        ans = (f"{town} is small enough to explore on foot, so {days} days is a good length.\n\n{plan}\n\n"
               f"For food, try {self.pick(FOOD_SPOTS)}.")
        pairs = [(ask, ans)]
        follow = [
            ("When is the best time of year to go?",
             f"Late {self.pick(['spring', 'summer'])} is usually best: the days are long and most places are open. "
             f"{self.pick(['July and August are busy', 'Winter is quiet but some sights close early'])}, so book ahead."),
            ("How do I get there by train?",
             f"{town} has a station on the line from {self.town()}. Trains run about every {self.pick([30, 60, 90])} minutes, and the journey takes around {self.r.randint(30, 150)} minutes."),
            ("Is it good for children?",
             f"Yes. Children usually enjoy {self.pick(ATTRACTIONS)} most, and there is a playground near {self.pick(ATTRACTIONS)}."),
        ]
        for q, a in self.sample(follow, self.turns() - 1):
            pairs.append((q, a))
        return self.msgs(*pairs)

    def gardening(self):
        plant = self.pick(self.subjects(PLANTS))
        sow = self.pick(MONTHS[1:6])
        ask = self.pick([
            f"When should I plant {plant}, and how much sun do they need?",
            f"I'd like to grow {plant} this year. Any advice for a beginner?",
        ])
        ans = (f"{cap(plant)} are best sown in {sow}, once the soil has started to warm up. "
               f"Choose a spot with {self.pick(['full sun', 'at least six hours of sun', 'sun for most of the day', 'light shade in the afternoon'])}, "
               f"and leave about {self.r.randint(5, 60)} cm between plants. "
               f"Water {self.pick(['regularly in dry weather', 'deeply once or twice a week', 'little and often while they are young'])}, "
               f"and you should be able to harvest after about {self.r.randint(6, 20)} weeks.")
        pairs = [(ask, ans)]
        follow = [
            ("Can I grow them in pots?",
             f"Yes, as long as the pot is at least {self.r.randint(20, 45)} cm deep and has drainage holes. Pots dry out faster, so check them every day in summer."),
            ("What pests should I watch out for?",
             f"The main problems are {self.pick(['slugs and snails', 'aphids', 'birds', 'caterpillars'])}. Check the plants in the evening and remove pests by hand, or use netting."),
            ("Do they need any fertiliser?",
             "A little general fertiliser every two weeks once they start to flower is enough. Too much feed gives lots of leaves and little crop."),
        ]
        for q, a in self.sample(follow, self.turns() - 1):
            pairs.append((q, a))
        return self.msgs(*pairs)

    def poem(self):
        subj = self.pick(self.subjects(POEM_SUBJECTS))
        w = POEM_WORDS
        lines = []
        for _ in range(self.pick([4, 4, 6])):
            lines.append(self.pick([
                f"The {self.pick(w['adj'])} {self.pick(w['noun'])} {self.pick(w['verb'])} above {subj},",
                f"and every {self.pick(w['noun'])} {self.pick(w['verb'])} in the {self.pick(w['adj'])} {self.pick(w['noun'])};",
                f"I hear the {self.pick(w['noun'])} that {self.pick(w['verb'])} and {self.pick(w['verb'])},",
                f"a {self.pick(w['adj'])} {self.pick(w['noun'])}, a {self.pick(w['adj'])} {self.pick(w['noun'])}.",
            ]))
        ask = self.pick([f"Write a short poem about {subj}.", f"Could you write me a few lines of poetry about {subj}?"])
        ans = "Here is a short poem:\n\n" + "\n".join(lines)
        pairs = [(ask, ans)]
        if self.turns() > 1:
            pairs.append((self.pick(["Can you give it a title?", "What would be a good title?"]),
                          f"How about \"{cap(self.pick(w['adj']))} {cap(self.pick(w['noun']))}\"? It picks up the mood of the poem without repeating the first line."))
        return self.msgs(*pairs)

    def email(self):
        who, what, letter, subj, hello = self.pick(self.subjects(EMAILS, key=lambda e: e[0] + e[1]))
        sig = self.pick(NAMES_FOR_SIG)
        ask = self.pick([
            f"Can you help me write a short, polite email to {who} saying that {what}? My name is {sig}.",
            f"Please draft an email to {who}: {what}. Sign it from {sig}.",
        ])
        ans = (f"Of course. Here is a draft:\n\nSubject: {subj}\n\n{hello},\n\n"
               f"I am writing to let you know that {letter}. "
               f"{self.pick(['I am sorry for any inconvenience this may cause.', 'Please let me know if you need anything else from me.', 'I would be grateful if you could look into this when you have time.'])}\n\n"
               f"Thank you for your understanding.\n\nBest regards,\n{sig}")
        pairs = [(ask, ans)]
        if self.turns() > 1:
            pairs.append(("Can you make it a bit less formal?",
                          f"Sure:\n\nHi,\n\nJust a quick note to say that {letter}. {self.pick(['Sorry about that!', 'Hope that is okay.', 'Let me know if that causes any problems.'])}\n\nThanks,\n{sig}"))
        return self.msgs(*pairs)

    def advice(self):
        goal = self.pick(self.subjects(list(ADVICE)))
        tips = self.sample(ADVICE[goal], self.r.randint(3, 5))
        ask = self.pick([f"Do you have any tips for {goal}?", f"I'd like some advice on {goal}. Where do I begin?"])
        ans = ("Here are a few things that help:\n\n" + "\n".join(f"{k}. {t}" for k, t in enumerate(tips, 1))
               + "\n\nYou do not need to do all of them at once; pick one or two and build from there.")
        pairs = [(ask, ans)]
        if self.turns() > 1:
            k = self.r.randrange(len(tips))
            pairs.append(("If I could only do one of these, which should it be?",
                          f"Start with number {k + 1}: {lower_first(tips[k])} It is simple, costs nothing, and makes the others easier later."))
        return self.msgs(*pairs)

    def summary(self):
        kind = self.pick(WIKI_KINDS)
        title, para = kind(self, 70, 170)
        sents = [s for s in para.split(". ") if s]
        ask = self.pick([
            f"Summarize this paragraph in two sentences:\n\n{para}",
            f"Can you give me the main points of the following text?\n\n{para}",
        ])
        lead = sents[0].rstrip(".") + "."
        extra = (sents[1].rstrip(".") + ".") if len(sents) > 1 else ""
        ans = f"{lead} {('The text also mentions that ' + lower_first(extra)) if extra else ''}".strip()
        pairs = [(ask, ans)]
        if self.turns() > 1:
            pairs.append((f"What kind of subject is {title}?",
                          f"From the paragraph, {title} is the subject of an encyclopedia-style entry: {lower_first(lead)}"))
        return self.msgs(*pairs)


CHAT_TOPICS = ["cooking", "maths", "python", "travel", "gardening", "poem", "email", "advice", "summary"]
CHAT_WEIGHTS = [3, 3, 2, 2, 2, 1, 2, 2, 2]


def render(messages) -> str:
    return "\n".join(f"{m['role'].strip()}: {m['content'].strip()}" for m in messages if m["content"].strip())


def chat_rows(seed: int, part: str, n: int, forbidden: list[str], empty_at: tuple[int, ...] = (),
              one_empty_at: tuple[int, ...] = ()) -> list[dict]:
    g = ChatGen(seed, part)
    avoid = dict.fromkeys(forbidden)
    rows, seen = [], {}
    while len(rows) < n:
        if len(rows) in empty_at:
            rows.append({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]})
            continue
        topic = g.r.choices(CHAT_TOPICS, weights=CHAT_WEIGHTS)[0]
        msgs = getattr(g, topic)()
        if len(rows) in one_empty_at:
            msgs = msgs[:4]
            msgs.append({"role": "user", "content": "Thanks, that's really helpful."})
            msgs.append({"role": "assistant", "content": ""})
        text, opener = render(msgs), msgs[0]["content"]
        if text in avoid or opener in avoid or text in seen or opener in seen:
            continue
        seen[text] = seen[opener] = None
        rows.append({"messages": msgs})
    return rows


# --------------------------------------------------------------------------------------------
def build() -> dict[str, str]:
    wiki = wiki_lines(SEEDS["wiki"], "eval", N_WIKI, [])
    train = wiki_lines(SEEDS["train"], "train", N_TRAIN, [l for l in wiki if l.strip()])
    chat = chat_rows(SEEDS["chat"], "eval", N_CHAT, [], empty_at=(7,), one_empty_at=(23,))
    chat_keys = []
    for row in chat:
        if render(row["messages"]):
            chat_keys += [render(row["messages"]), row["messages"][0]["content"]]
    calib = chat_rows(SEEDS["calib"], "train", N_CALIB, chat_keys + [l for l in wiki if l.strip()])

    def jsonl(rows):
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    return {
        "wiki_mini.txt": "\n".join(wiki) + "\n",
        "train_mini.txt": "\n".join(train) + "\n",
        "chat_mini.jsonl": jsonl(chat),
        "calib_mini.jsonl": jsonl(calib),
    }


def write_or_check(files: dict[str, str], *, here: Path, description: str, argv=None) -> int:
    """The generators' command line: write ``files`` (name -> text) atomically, or with ``--check``
    report any committed file that differs from the fresh build (exit 1)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: next to the script)")
    ap.add_argument("--check", action="store_true", help="fail if the files on disk differ from a fresh build")
    args = ap.parse_args(argv)
    out = args.out or here
    bad = 0
    for name, text in files.items():
        path = out / name
        if args.check:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            print(f"{name}: {'ok' if same else 'DIFFERS'}")
            bad += not same
        else:
            out.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8", newline="\n")
            tmp.replace(path)
            print(f"wrote {path} ({len(text.encode('utf-8')):,} bytes, {text.count(chr(10)):,} lines)")
    return 1 if bad else 0


def main(argv=None) -> int:
    return write_or_check(build(), here=HERE, description=__doc__.splitlines()[0], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
