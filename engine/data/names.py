"""Label strings: cleaning clip-art file names and emoji names, English plurals/articles, and
made-up (nonce) words for few-shot naming.

Open Clip Art file names look like ``apple_bitten_dan_gerhard_01.png``: a title, the author's
name, the whole cut to ~24 characters, and a number; many titles are Italian.  We keep a label
only when we can find a plain English noun in it.  The noun vocabulary is taken from Unicode's
names of pictographic symbols (``unicodedata``: CAT, RED APPLE, TRUMPET, ...) plus a short list of
common clip-art nouns, so a label is always a word a small language model knows.
"""

from __future__ import annotations

import functools
import random
import re
import unicodedata
from pathlib import PurePosixPath

# ------------------------------------------------------------------------------------------
# vocabulary

# Unicode blocks of pictographs and symbols whose names are plain English.
_SYMBOL_RANGES = [(0x2190, 0x2BFF), (0x1F000, 0x1FAFF)]
# The blocks emoji live in (Noto Color Emoji draws these).
_EMOJI_RANGES = [(0x2600, 0x27BF), (0x1F300, 0x1FAFF)]

# Common clip-art nouns that no emoji is named after.
_EXTRA_NOUNS = """
armadillo antelope bag basket bee beetle bicycle bird boat book bottle bowl box bucket bull
bulb butterfly cabinet cake calculator camel candle car castle chair cheetah chicken cloud
clock coffee computer crab crawfish cup deer desk dinosaur dog dolphin donkey dragon drum duck
eagle elephant fish flag flower fox frog giraffe glass globe goat guitar hammer hat hedgehog
helmet horse house jar kangaroo key ladybug lamp leaf lemon lighthouse lion lizard lobster lock
magnet monkey moose mouse mushroom owl panda parrot pear pen pencil penguin piano pig pineapple
plane rabbit raccoon rhinoceros robot rocket rooster scissors seagull shark sheep shield ship
shoe skull snail snake spider squirrel star strawberry sun swan table teapot telephone tiger
tomato tractor train tree truck trumpet turtle umbrella unicorn violin whale wolf zebra
anchor apple banana bear bell boot bus cactus camera carrot cat cherry cow crown dice
fork glasses hamster heart igloo kite knife ladder leopard mailbox microphone moon octopus
orange pizza plant puzzle radio saxophone screwdriver skateboard sled snowman sword tent
toothbrush tulip wrench
penguin ibex bison pelican stork heron crow dove flamingo hen gull puffin cormorant
tux ladybird pumpkin radish garlic wallet compass binoculars suitcase briefcase stapler
gift hourglass printer keyboard monitor laptop diskette floppy trophy medal cupcake muffin pie
candy lollipop sandwich hamburger sausage cheese bread croissant wine beer teacup mug kettle
""".split()

# Colours, sizes, directions and function words: never the first word of a compound label.
_MODIFIERS = set("""
a an the of and or with without in on at to for from by over under into its it his her
black white red green blue yellow orange purple brown grey gray pink gold golden silver dark
heavy medium large small big little tiny huge long short tall high low full empty half
open closed upper lower left right up down top bottom front back side middle
leftwards rightwards upwards downwards pointing facing oncoming raised reversed crossed
double triple single two three four five six seven eight nine ten one first second third
new old simple cartoon stylized happy angry sad smiling grinning
""".split())

# Extra two-word names worth keeping whole.
_EXTRA_PHRASES = {"teddy bear", "traffic light", "light bulb", "soccer ball", "table tennis",
                  "fire engine", "fire extinguisher", "paper plane", "rubber duck",
                  "magnifying glass", "world map", "christmas tree", "musical note",
                  "beach ball", "paint roller", "tennis racket", "baseball bat", "bass guitar",
                  "electric guitar", "french horn", "french fries", "onion rings",
                  "potato chips", "fried egg", "palm tree", "hot dog", "ice cream",
                  "stick figure", "jigsaw puzzle piece", "satellite dish", "water tower",
                  "roller skate", "life buoy", "test tube", "video camera", "movie camera",
                  "mobile phone", "baseball glove", "rubik cube"}

# Words that appear in symbol names but make poor labels on their own (modifiers, shapes of
# Unicode naming, directions, generic words).
_NOT_HEAD = _MODIFIERS | set("""
a an the of and or with without in on at to for from by over under into its it his her
black white red green blue yellow orange purple brown grey gray pink gold golden silver dark
light heavy medium large small big little tiny huge long short tall high low full empty half
open closed upper lower left right up down top bottom front back side middle center centre
leftwards rightwards upwards downwards pointing facing oncoming raised reversed crossed
double triple single two three four five six seven eight nine ten one first second third
new old baby young simple cartoon stylized stylised happy angry sad crazy cute funny smiling
grinning hot cold wet dry sign symbol mark ornament emblem icon logo button square squared
circle circled round rounded shape shaped line lines thin thick bold outline contour outlined
drawn drawing sketch silhouette style design clip art clipart image picture photo
type face part set mode stroke dot dots point bar bars pair group drop curl loop end
extended extra very mini super ultra mega micro negative positive plus minus
standing sitting running flying walking looking sleeping waving holding playing
vertical horizontal diagonal inverted rotated turned
person people man woman men women boy girl child adult
head paper general lane page david copper inside room drive water construction food air aid
stars liberty entry snow rain scale hand stop palm elevator pump board machine christmas peace
wedge wedding rule south free you record modern flat king police del australia africa europe
asia america island islands hygieia metro motorway screen net disk earth
""".split())

# Author-name fragments and file-id noise seen in openclipart-png names.
_AUTHOR_TOKENS = set("""
architetto architet archite archit archi arch francesco frances francesc france franc fran fra
rollandin nicu buculei bucu benji park ganson jean victor balin bali jarno vasamaa vasama
juliane krug gerald geral gera ger jon phillips yves guillou yve linda kim mo dan gerhard
gerhards peterm mateya lumen desig design zazou sergio luiz arauj nicolas mimooh ark berlin
ralf ste enrique meza matthew gates michael joel fudriot marcelo staudt caiafa leif lodahl
dave pena jonathan dietrich diet jonadab mike susan martin schmidt kurt cagle cagl frouke
brice cedric costea donna petri montes stefan omic aj jk bb bwh sm md bw rpg svg inkscape
toh yen cheng alex kuehne rory mccann charles mcco kilfige james andremarcel andre marcel yager goneri
bouder gabriel lo erwan shandy brown utrescu orlando karam lasse hugo rafal hrvoje pd
""".split()) - {"brown"}

# A title holding one of these is not a picture of an object (maps, diagrams, famous people,
# text), whatever nouns it also holds.
_DROP_TITLE_WORDS = set("""
map maps luther jr capitol rules theory diagram chart schema graph text font alphabet letter
logo icon button banner border frame pattern texture background wallpaper tile corner
flourish divider ornament calendar certificate coupon label sticker hole holes fight
""".split())

# Titles in other languages (mostly Italian) that are common in the collection.
TRANSLATIONS = {
    "acquila": "eagle", "aquila": "eagle", "cigno": "swan", "cigni": "swan",
    "gabbiano": "seagull", "gallo": "rooster", "gufo": "owl", "civetta": "owl",
    "pollo": "chicken", "gallina": "hen", "tacchino": "turkey", "uccello": "bird",
    "uccelli": "bird", "canguro": "kangaroo", "coniglio": "rabbit", "elefante": "elephant",
    "pecora": "sheep", "topo": "mouse", "toro": "bull", "vacca": "cow", "mucca": "cow",
    "stambecco": "ibex", "lucertola": "lizard", "lucertolona": "lizard",
    "lucertolone": "lizard", "ramarro": "lizard", "rana": "frog", "pera": "pear",
    "pesca": "peach", "prugna": "plum", "cavallo": "horse", "gatto": "cat", "gattina": "cat",
    "cane": "dog", "pinguino": "penguin", "farfalla": "butterfly", "farfalle": "butterfly",
    "fiore": "flower", "fiori": "flower", "albero": "tree", "casa": "house", "orso": "bear",
    "leone": "lion", "tigre": "tiger", "antilope": "antelope", "dinosauro": "dinosaur",
    "dinosauri": "dinosaur", "dino": "dinosaur", "lumaca": "snail", "zanzara": "mosquito",
    "moschito": "mosquito", "cavalletta": "grasshopper", "libellula": "dragonfly",
    "coccinella": "ladybug", "coccinellona": "ladybug", "formichina": "ant",
    "formicona": "ant", "ragno": "spider", "insetto": "bug", "lucchetto": "padlock",
    "siringa": "syringe", "microscopio": "microscope", "cesto": "basket", "valigie": "suitcase",
    "borsa": "bag", "cinepresa": "movie camera", "telecamera": "video camera",
    "palloncini": "balloon", "anelli": "ring", "provette": "test tube",
    "proiettore": "projector", "tavolozza": "palette", "sedia": "chair", "poltrona": "armchair",
    "tavolo": "table", "teiera": "teapot", "tazza": "cup", "ravanello": "radish",
    "aglio": "garlic", "zucca": "pumpkin", "pomodori": "tomato", "torta": "cake",
    "calcolatrice": "calculator", "lettera": "letter", "cestino": "wastebasket",
    "fabbrica": "factory", "clessidra": "hourglass", "pinzatrice": "stapler",
    "puntine": "pushpin", "finestra": "window", "salvagente": "life buoy",
    "stampante": "printer", "trattore": "tractor", "bicicletta": "bicycle", "viti": "screw",
    "calamita": "magnet", "chiave": "key", "binocolo": "binoculars", "secchio": "bucket",
    "bussola": "compass", "portafoglio": "wallet", "dente": "tooth", "pattino": "roller skate",
    "camicia": "shirt", "mondo": "globe", "ruota": "wheel", "mattone": "brick",
    "sapone": "soap", "lattine": "can", "macchina": "machine", "ferro": "iron",
    "scodella": "bowl", "cubo": "cube", "ballerina": "dancer", "fata": "fairy",
    "pasteque": "watermelon", "champignon": "mushroom", "flamand": "flamingo",
    "rondelle": "orange", "canguru": "kangaroo", "porcinet": "pig", "punaisa": "bug",
    "bunny": "rabbit", "kitty": "cat", "kitten": "cat", "puppy": "dog", "doggy": "dog",
    "aeroplane": "airplane", "plane": "airplane", "auto": "car", "automobile": "car",
    "lightbulb": "light bulb", "baloon": "balloon", "baloon1": "balloon",
    "colour": "color", "toadstool": "mushroom", "camcorder": "video camera",
    "gun": "pistol", "keyring": "key", "gift": "gift", "present": "gift", "xmas": "christmas tree",
    "cloudy": "cloud", "ghiaccio": "ice cube", "forchettoni": "fork", "cellphone": "mobile phone", "teddy": "teddy bear",
}

# Folder names that say what every picture in them is (when the file name says nothing
# better) and folders whose files are not objects at all.
FOLDER_LABELS = {
    "stars": "star", "housecats": "cat", "big_cats": "tiger", "dogs": "dog", "horses": "horse",
    "bears": "bear", "dinosaurs": "dinosaur", "fish": "fish", "birds": "bird", "bugs": "bug",
    "penguin": "penguin", "trees": "tree", "evergreen": "tree", "flowers": "flower",
    "clocks": "clock", "hats": "hat", "books": "book", "bulb": "light bulb", "battery": "battery",
    "telephone": "telephone", "chess": "chess piece", "hummers": "car", "homes": "house",
    "smilies": "smiley", "stickmen": "stick figure", "arrows": "arrow",
}
# Any file whose path passes through one of these folders is labelled by the folder alone.
FORCED_FOLDERS = {"stars": "star", "jigsaw": "jigsaw puzzle piece", "flags": "flag"}
# Folders of non-objects (icons, gradients, fonts, flowcharts, card faces, ...).
EXCLUDED_FOLDERS = {
    "icons", "gradients", "patterns", "examples", "special", "flowchart", "callouts", "led",
    "semaphore", "cards", "duplicates", "diagrams", "network", "connectors", "logos",
    "map_symbols", "buttons", "roadsigns", "aiga-symbols", "folders", "games", "religion",
    "pantyhose", "bodypart",
}

_SINGULAR_EXCEPTIONS = {
    "mice": "mouse", "geese": "goose", "teeth": "tooth", "feet": "foot", "men": "man",
    "women": "woman", "children": "child", "people": "person", "leaves": "leaf",
    "knives": "knife", "wolves": "wolf", "cherries": "cherry", "puppies": "puppy",
    "dice": "dice", "glasses": "glasses", "scissors": "scissors", "binoculars": "binoculars",
    "pants": "pants", "jeans": "jeans", "shorts": "shorts", "grapes": "grapes",
    "fries": "fries", "sunglasses": "sunglasses", "eyeglasses": "eyeglasses",
    "goggles": "goggles", "headphones": "headphones", "crossbones": "crossbones",
    "trousers": "trousers", "clothes": "clothes", "tongs": "tongs", "pliers": "pliers",
}
_NOT_PLURAL = {
    "bus", "cactus", "octopus", "hippopotamus", "rhinoceros", "lotus", "abacus", "compass",
    "glass", "dress", "chess", "canvas", "atlas", "gas", "lens", "tennis", "billiards",
    "asparagus", "walrus", "iris", "mantis", "platypus", "diplodocus", "hibiscus", "bonus",
    "virus", "circus", "bass", "grass", "cross", "moss", "kiss", "boss", "press", "hummus",
    "news", "dice", "yes", "this", "its", "his", "plus", "minus", "class", "status",
    "christmas", "xmas", "mathematics", "physics", "species", "series",
}


def _emoji_names() -> list[list[str]]:
    """Words of the Unicode names of pictographs (emoji blocks), e.g. ['red', 'apple']."""
    out = []
    for lo, hi in _EMOJI_RANGES:
        for cp in range(lo, hi + 1):
            name = unicodedata.name(chr(cp), "")
            words = [w for w in re.split(r"[\s\-]+", name.lower()) if w]
            if words and all(w.isalpha() for w in words):
                out.append(words)
    return out


@functools.lru_cache(maxsize=1)
def symbol_vocabulary() -> frozenset[str]:
    """Every lowercase word of a pictograph's name (used to keep nonce words unreal)."""
    words: set[str] = set(_EXTRA_NOUNS)
    for lo, hi in _SYMBOL_RANGES:
        for cp in range(lo, hi + 1):
            for w in re.split(r"[\s\-]+", unicodedata.name(chr(cp), "").lower()):
                if w.isalpha():
                    words.add(w)
    return frozenset(words)


@functools.lru_cache(maxsize=1)
def noun_vocabulary() -> frozenset[str]:
    """Head nouns: the last word of each emoji name (CAT, RED APPLE, HOT DOG -> cat, apple,
    dog) plus common clip-art nouns; these are the words a clip-art label may end in."""
    words = set(_EXTRA_NOUNS)
    for ws in _emoji_names():
        words.add(ws[-1])
        words.add(singular(ws[-1]))
    return frozenset(w for w in words if len(w) >= 3 and w not in _NOT_HEAD)


@functools.lru_cache(maxsize=1)
def _symbol_phrases() -> frozenset[str]:
    """Two-word names inside emoji names ("light bulb", "hot dog", "traffic light")."""
    out: set[str] = set(_EXTRA_PHRASES)
    for ws in _emoji_names():
        for a, b in zip(ws, ws[1:]):
            if a not in _MODIFIERS and b not in _MODIFIERS and len(a) >= 3 and len(b) >= 3:
                out.add(f"{a} {b}")
    return frozenset(out)


def _is_noun(word: str) -> bool:
    return word in noun_vocabulary() and word not in _AUTHOR_TOKENS


# ------------------------------------------------------------------------------------------
# English helpers


def singular(word: str) -> str:
    """A best-effort singular of one lowercase English word."""
    if word in _SINGULAR_EXCEPTIONS:
        return _SINGULAR_EXCEPTIONS[word]
    if len(word) <= 3 or word in _NOT_PLURAL or word.endswith(("ss", "us", "is", "ous")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "zzes")):
        return word[:-2]
    if word.endswith("oes") and word[:-2] in symbol_vocabulary():
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


_PLURAL_EXCEPTIONS = {
    "mouse": "mice", "goose": "geese", "tooth": "teeth", "foot": "feet", "man": "men",
    "woman": "women", "child": "children", "person": "people", "sheep": "sheep", "fish": "fish",
    "deer": "deer", "bison": "bison", "moose": "moose", "ox": "oxen", "leaf": "leaves",
    "knife": "knives", "wolf": "wolves", "shelf": "shelves", "loaf": "loaves",
    "cactus": "cacti", "octopus": "octopuses", "dice": "dice", "tux": "tuxes",
}


def is_plural(label: str) -> bool:
    """Whether a label already names several things ("grapes", "cherries")."""
    last = label.split()[-1]
    if last in _SINGULAR_EXCEPTIONS:
        return last != "dice"
    return singular(last) != last


def plural(label: str) -> str:
    """English plural of a label, inflecting its last word ("hot dog" -> "hot dogs")."""
    if is_plural(label):
        return label
    head, _, last = label.rpartition(" ")
    if last in _PLURAL_EXCEPTIONS:
        p = _PLURAL_EXCEPTIONS[last]
    elif re.search(r"[^aeiou]y$", last):
        p = last[:-1] + "ies"
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        p = last + "es"
    elif last.endswith(("tomato", "potato", "volcano", "mango")):
        p = last + "es"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


def with_article(label: str) -> str:
    """'a cat', 'an apple', or the bare label for plurals and mass nouns ('grapes')."""
    if is_plural(label):
        return label
    if label[:1] in "aeiou" and not label.startswith(("uni", "use", "euro", "one")):
        return f"an {label}"
    if label.startswith(("hour", "honest")):
        return f"an {label}"
    return f"a {label}"


# ------------------------------------------------------------------------------------------
# clip-art names


def _tokens(text: str) -> list[str]:
    text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)  # camelCase
    out = []
    for t in re.split(r"[^A-Za-z0-9]+", text.lower()):
        t = re.sub(r"\d+[a-z]?$", "", t)  # trailing ids: rana01, arrow3, 01r
        if not t or any(c.isdigit() for c in t) or len(t) < 2:
            continue
        out.append(t)
    return out


def _label_from_tokens(tokens: list[str]) -> str | None:
    """The first English noun (or two-word name) in a title's tokens."""
    toks = [w for t in tokens for w in TRANSLATIONS.get(t, t).split()]
    if any(t in _DROP_TITLE_WORDS for t in toks):
        return None
    for i, t in enumerate(toks):
        if t in _AUTHOR_TOKENS:
            continue
        if i + 1 < len(toks):  # compound noun: "light bulb", "hot dog", "fire engine"
            nxt = singular(toks[i + 1])
            pair = f"{t} {nxt}"
            if pair in _EXTRA_PHRASES or (pair in _symbol_phrases() and _is_noun(nxt)):
                return pair
        one = singular(t)
        cand = one if _is_noun(one) else t  # prefer the singular: "pancakes" -> "pancake"
        if _is_noun(cand):
            return cand
    return None


def clean_clipart_name(relpath: str) -> str | None:
    """A short English label for an openclipart-png file (path relative to the png root),
    or None when the file is not a nameable object.

    >>> clean_clipart_name("food/fruit/apple_bitten_dan_gerhard_01.png")
    'apple'
    >>> clean_clipart_name("animals/birds/acquila_architetto_franc_01.png")
    'eagle'
    """
    p = PurePosixPath(relpath.replace("\\", "/"))
    folders = [f.lower() for f in p.parts[:-1]]
    if any(f in EXCLUDED_FOLDERS for f in folders):
        return None
    for f in folders:
        if f in FORCED_FOLDERS:
            return FORCED_FOLDERS[f]
    tokens = _tokens(p.stem)
    if tokens[:1] == ["orange"] and ("fruit" in folders or "food" in folders):
        return "orange"  # the fruit, not the colour
    label = _label_from_tokens(tokens)
    if label is None and folders and folders[-1] in FOLDER_LABELS:
        label = FOLDER_LABELS[folders[-1]]
    return label


# ------------------------------------------------------------------------------------------
# emoji names

# Emoji whose names describe people, hands, faces, marks and keys rather than objects; they are
# either fine-grained variations of one yellow face or not pictures of a thing at all.
_EMOJI_DROP_WORDS = set("""
face person man woman men women boy girl child adult family couple people hand hands finger
fingers fist index thumbs palm palms sign symbol squared circled keycap input modifier
component oclock thirty mark ornament button regional letter digit flag flags selfie
pregnant older bearded bride prince princess guardsman dancer runner swimmer golfer surfer
skier snowboarder bicyclist pedestrian juggling wrestlers fencer worker officer sleuth
massage haircut levitating bowing frowning pouting shrug cartwheel standing kneeling deaf
climbing lotus steamy mage fairy vampire merperson elf genie zombie superhero supervillain
troll ninja kiss heart hearts biceps nose ear eyes eye mouth tongue lips tooth leg foot
speaking silhouette busts bust
""".split()) - {"lotus", "heart", "tooth", "leg", "foot", "ear", "eye", "nose", "mouth"}
_EMOJI_DROP_NAMES = {w.strip() for line in """
aries|taurus|gemini|cancer|leo|virgo|libra|scorpius|sagittarius|capricorn|aquarius|pisces
ophiuchus|back|end|soon|top|on|multiplication x|rightwards arrow|curly loop|double curly loop
sparkle|sparkles|hugging|rolling|compression|cooking|customs|station|page|seat|frame|clothes
money|chart|night|wheel of dharma|vibration mode|baggage claim|left luggage|passport control
restroom|water closet|children crossing|place of worship|currency exchange|level slider
control knobs|performing arts|direct hit|heart decoration|diamond shape|pig nose|biting lip
leaf fluttering|right anger bubble|left speech bubble|pouring liquid|breast-feeding|imp|moyai
oden|dango|hot springs|foggy|fog|cyclone|milky way|mobile phone off|hocho|kaaba|hamsa
nazar amulet|tanabata tree|pine decoration|carp streamer|izakaya lantern|bento box|prayer beads
""".splitlines() for w in line.split("|") if w.strip()}
_EMOJI_RENAME = {"automobile": "car", "hocho": "knife", "teacup": "teacup", "aubergine": "eggplant",
                 "honeybee": "bee", "lady beetle": "ladybug", "game die": "dice",
                 "electric light bulb": "light bulb", "personal computer": "laptop",
                 "headphone": "headphones", "earth globe americas": "globe", "doughnut": "donut",
                 "spouting whale": "whale", "t-rex": "t-rex", "rugby football": "rugby ball",
                 "slice of pizza": "pizza", "meat on bone": "meat", "wrapped present": "gift",
                 "sauropod": "dinosaur", "dromedary camel": "camel", "poodle": "dog"}
_COLOURS = {"red", "green", "blue", "yellow", "orange", "purple", "brown", "black", "white",
            "pink", "grey", "gray"}
_EMOJI_STRIP_PREFIX = ("black ", "white ", "heavy ", "medium ", "lower left ", "oncoming ",
                       "large ", "small ")


def clean_emoji_name(name: str) -> str | None:
    """A short label from a Unicode emoji name, or None for emoji that are not objects.

    >>> clean_emoji_name("UMBRELLA WITH RAIN DROPS")
    'umbrella'
    >>> clean_emoji_name("DOG FACE")
    'dog'
    """
    n = name.lower()
    n = re.sub(r"\b(womans|mans)\b", "", n).strip()
    words = n.split()
    if len(words) == 2 and words[1] == "face" and _is_noun(words[0]):
        return words[0]  # animal faces: CAT FACE -> cat (same concept as CAT)
    if any(w in _EMOJI_DROP_WORDS for w in words) or words[:1] == ["no"]:
        return None
    for pre in _EMOJI_STRIP_PREFIX:
        if n.startswith(pre) and len(n.split()) > 1:
            n = n[len(pre):]
    n = re.split(r"\b(?:with|without|in|on|at|behind|over|above)\b", n)[0].strip()
    n = re.sub(r"\b(symbol|sign|emblem)\b", "", n).strip()
    words = n.split()
    if len(words) == 2 and words[0] in _COLOURS:
        if words[1] in ("circle", "square", "diamond", "triangle"):
            return None  # coloured shapes are for colour questions, not concepts
        n, words = words[1], words[1:]  # blue book -> book, green heart -> heart
    n = _EMOJI_RENAME.get(n, n)
    if not words or len(words) > 3 or len(n) > 20 or n in _EMOJI_DROP_NAMES:
        return None
    if any(c.isdigit() for c in n):
        return None
    return n


# ------------------------------------------------------------------------------------------
# nonce words

_ONSETS = list("bdfgklmnprstvwz") + ["bl", "gl", "kr", "pl", "sn", "tr", "dr", "fl", "j", "ch"]
_MIDDLE = list("bdfgklmnprstvz")
_VOWELS = list("aeiou")
_FINAL_VOWELS = list("aiou")  # no final -e: "bike", "lake" are English
# Real words these patterns can make, and fragments nobody wants in a training document.
_REAL_NONCE = set("""
fax fix fox box six wax mix tax sax lax vex max tux lux pox pix rex flax flex flux burp tarp
harp warp carp twerp chirp soda tuba menu lava coma data diva sofa puma judo kilo memo solo
taco pita tofu halo demo limo polo veto logo sumo tutu mama papa dodo cola toga gala mini
tuna yoga kiwi robot wagon lemon melon salad panic topic rapid solid vivid habit limit visit
timid tonic comic relic medal metal pedal petal total vital fatal tidal modal nasal camel
model novel level bagel label denim venom vomit sonic tunic cabin robin satin bison pilot
lilac tulip gamut vapor sugar tumor humor rumor lotus bonus sinus venus minus virus focus
bogus kaput donut licit digit remit merit rivet comet tepid vapid valid livid rigid lucid
fetid humid cupid canon talon felon baton salon demon lemon wagon bacon pecan sedan japan
kimono banana papaya potato tomato zebra radio rodeo video patio piano viola sonata
mocha matcha pasta pizza polka karma drama koala tiara safari salami
kamikaze bikini martini zucchini lox visa pinot derp vox sux dex lex trix ridin
""".split())
_BAD_FRAGMENTS = ("nig", "fag", "cum", "tit", "dik", "dic", "coc", "cok", "kok", "puss",
                  "rape", "anal", "anus", "sex", "semen", "jiz", "nazi", "slut", "homo", "wank",
                  "twat", "fuk", "fuc", "shit", "piss", "crap", "kum", "kunt", "cunt", "poo",
                  "pee", "nud", "gay", "kill", "die", "dead", "gun", "bum", "butt", "tard",
                  "spic", "kike", "chink", "gook", "jap", "paki", "coon", "dago", "wop")


def nonce_word(rng: random.Random) -> str:
    """A short pronounceable made-up word in the style of 'dax', 'zorp', 'tuvo', 'zibet'."""
    if rng.random() < 0.3:  # one closed syllable: dax, zorp, blix
        return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(["x", "x", "rp"])
    word = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_MIDDLE)
            + rng.choice(_FINAL_VOWELS))
    return word + rng.choice(["", "", "t", "x", "p", "k", "m", "n"])


def _acceptable_nonce(w: str) -> bool:
    return w not in _REAL_NONCE and not any(f in w for f in _BAD_FRAGMENTS)


def nonce_words(rng: random.Random, n: int, avoid: set[str] | frozenset[str] = frozenset()
                ) -> list[str]:
    """``n`` distinct nonce words, none of them a real word we know or in ``avoid``."""
    out: list[str] = []
    seen = set(avoid)
    vocab = symbol_vocabulary()
    while len(out) < n:
        w = nonce_word(rng)
        if (w in seen or w in vocab or w in _NOT_HEAD or w in TRANSLATIONS
                or w in _AUTHOR_TOKENS or not _acceptable_nonce(w)):
            continue
        seen.add(w)
        out.append(w)
    return out
