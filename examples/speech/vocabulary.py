"""The fixed word lists the datasets draw from, and the character set of the transcripts."""

from __future__ import annotations

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "oh")

# Common short English words: the phrase vocabulary of the recogniser and the distractors and babble of the
# trigger-word clips. Letters only, so that every transcript character is in CHARACTERS.
WORDS = tuple(
    """
    about above across after again against air all almost alone along already also always among and animal
    another answer any apple area arm around ask away baby back bad bag ball bank bed before begin behind
    below best better between big bird black blue boat body book both box boy bread bring brother brown
    build burn busy buy call came car card care carry cat catch chair change child city clean clear clock
    close cloud cold colour come cook cool corner country cover cross cup cut dark day deep dinner dog door
    down draw dream dress drink drive dry during each early earth east easy eat egg end enough evening
    every eye face fall family far farm fast father feel few field fill find fine finger fire fish floor
    flower fly follow food foot forest forget free fresh friend front fruit full game garden girl give glass
    go gold good grass great green ground group grow hair half hand happy hard hat have head hear heart
    heavy help here high hill hold home horse hot hour house hundred idea inside island just keep key kind
    king kitchen know lake land large last late laugh learn leave left letter light line listen little live
    long look love low machine make many map market milk minute money month moon morning mother mountain
    mouth move music name near never new next night noise north nothing number ocean office old open orange
    other outside page paint paper park party pass people pick picture piece place plant play please point
    poor question quick quiet rain read ready red remember rest rich right river road rock room round run
    salt same sand school sea second see sell send seven shape ship shoe short show side simple sing sister
    sit sky sleep slow small smile snow soft song soon sound south speak spring square stand star start
    station stone stop story street strong sugar summer sun table take talk tall teacher tell thing think
    today together tomorrow tonight town train tree true turn under up valley very visit voice wait walk
    wall warm watch water weather week west wheel white wind window winter wood word work world write
    yellow yesterday young
    """.split()
)

TRIGGER_WORD = "activate"

# Hard negatives for the trigger word: words that share its sounds ("ac", "tiv", "vate") without being it. The
# trigger clips draw distractors from here only when asked (`TriggerConfig.near_trigger_fraction`).
NEAR_TRIGGER_WORDS = tuple(
    """
    active activity actively activist action actor actual captivate cultivate motivate vacate elevate
    renovate innovate aggravate navigate derivative relative attractive native private tractor
    """.split()
)

# Transcript characters; CTC's blank is index 0, so character c has label CHARACTERS.index(c) + 1.
CHARACTERS = " abcdefghijklmnopqrstuvwxyz"


def encode(text: str) -> list[int]:
    """Transcript -> CTC labels (1..len(CHARACTERS); 0 is the blank)."""
    return [CHARACTERS.index(c) + 1 for c in text]


def decode(labels: list[int]) -> str:
    """CTC labels (no blanks) -> transcript."""
    return "".join(CHARACTERS[i - 1] for i in labels)
