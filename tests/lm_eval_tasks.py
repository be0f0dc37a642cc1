"""Local lm-eval tasks for offline tests: small jsonl files shaped like each dataset's hub
rows, and task YAMLs that `include` lm-eval's own task (its prompts, choices and metrics)
with only the dataset swapped for the local file."""

import json
from pathlib import Path

ARC = [
    (
        "Which gas do plants take in from the air to make food?",
        ["oxygen", "carbon dioxide", "nitrogen", "helium"],
        1,
    ),
    ("What is the boiling point of water at sea level in Celsius?", ["50", "75", "100", "150"], 2),
    ("Which organ pumps blood through the body?", ["heart", "lung", "liver", "kidney"], 0),
    ("What force pulls objects toward the Earth?", ["magnetism", "friction", "gravity", "tension"], 2),
    ("Which of these is a mammal?", ["shark", "frog", "whale", "lizard"], 2),
    ("What do bees collect from flowers?", ["sand", "nectar", "leaves", "stones"], 1),
    ("Which planet is closest to the Sun?", ["Mars", "Venus", "Earth", "Mercury"], 3),
    ("What state of matter is ice?", ["solid", "liquid", "gas", "plasma"], 0),
    ("Which tool measures temperature?", ["ruler", "thermometer", "scale", "compass"], 1),
    ("What does a caterpillar become?", ["a bird", "a butterfly", "a spider", "a fish"], 1),
]
HELLASWAG = [
    (
        "Baking cookies",
        "A woman mixes flour and sugar in a bowl.",
        "she",
        [
            "pours the dough onto a tray and puts it in the oven.",
            "drives a car down the highway.",
            "paints the walls of the room blue.",
            "swims across the lake quickly.",
        ],
        0,
    ),
    (
        "Washing a car",
        "A man sprays water on a red car.",
        "he",
        [
            "reads a book in the library.",
            "scrubs the car with a soapy sponge.",
            "climbs a tall mountain.",
            "plays the piano loudly.",
        ],
        1,
    ),
    (
        "Playing the guitar",
        "A boy sits on a chair holding a guitar.",
        "he",
        [
            "eats a sandwich with ketchup.",
            "runs a marathon in the rain.",
            "strums the strings and sings a song.",
            "plants seeds in the garden.",
        ],
        2,
    ),
    (
        "Brushing teeth",
        "A girl puts toothpaste on a toothbrush.",
        "she",
        [
            "brushes her teeth in front of the mirror.",
            "throws a ball to the dog.",
            "writes a letter to her friend.",
            "rides a horse on the beach.",
        ],
        0,
    ),
    (
        "Mowing the lawn",
        "A man pushes a lawn mower across the yard.",
        "the grass",
        [
            "sings a song on the radio.",
            "flies into space.",
            "is cut short in neat rows.",
            "melts in the sun.",
        ],
        2,
    ),
    (
        "Making tea",
        "A woman boils water in a kettle.",
        "she",
        [
            "pours the hot water over a tea bag in a cup.",
            "repairs a bicycle tire.",
            "jumps over a fence.",
            "folds a paper airplane.",
        ],
        0,
    ),
]
PIQA = [
    ("To keep bread fresh longer,", "store it in a sealed bag.", "leave it in the rain.", 0),
    ("To cool down a hot drink quickly,", "put it in the oven.", "add a few ice cubes.", 1),
    ("To dry wet clothes,", "hang them in the sun.", "put them in the freezer.", 0),
    ("To open a jar with a tight lid,", "run the lid under hot water.", "paint the jar.", 0),
    ("To see better at night,", "turn off every light.", "use a flashlight.", 1),
    ("To stop a bleeding cut,", "press a clean cloth on it.", "rub salt into it.", 0),
]
TEXTS = [
    "The river runs through the valley and past the old mill, where the wheel still turns.",
    "Python is a programming language that lets you work quickly and integrate systems effectively.",
    "In the morning the market fills with people buying bread, fruit and fresh fish.",
]
QA = [("What is two plus two?", "four"), ("What color is the sky on a clear day?", "blue")]


def lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def local_task(
    folder: Path, name: str, include: str, data: str, splits=("train", "validation", "test")
) -> None:
    files = {split: data for split in splits}
    text = (
        f"task: {name}\ninclude: {lm_eval_tasks_dir() / include}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files: {json.dumps(files)}\n"
    )
    (folder / f"{name}.yaml").write_text(text)


def write_tasks(folder: Path, copies: int = 1) -> Path:
    """arc_easy_local, hellaswag_local, piqa_local (multiple choice, lm-eval's prompts),
    rolling_local (loglikelihood_rolling) and qa_local (generate_until) in `folder`; the
    multiple-choice items `copies` times over, numbered so that no two contexts are equal."""
    folder.mkdir(parents=True, exist_ok=True)
    number = (lambda c, text: text) if copies == 1 else (lambda c, text: f"({c}) {text}")
    arc = [
        {
            "id": f"q{c}-{i}",
            "question": number(c, q),
            "choices": {"text": ch, "label": list("ABCD")},
            "answerKey": "ABCD"[a],
        }
        for c in range(copies)
        for i, (q, ch, a) in enumerate(ARC)
    ]
    local_task(folder, "arc_easy_local", "arc/arc_easy.yaml", write_jsonl(folder / "arc.jsonl", arc))
    hellaswag = [
        {
            "ind": i,
            "activity_label": act,
            "ctx_a": a,
            "ctx_b": b,
            "ctx": f"{number(c, a)} {b}",
            "endings": e,
            "source_id": f"local~{i}",
            "split": "val",
            "split_type": "indomain",
            "label": str(label),
        }
        for c in range(copies)
        for i, (act, a, b, e, label) in enumerate(HELLASWAG)
    ]
    local_task(
        folder,
        "hellaswag_local",
        "hellaswag/hellaswag.yaml",
        write_jsonl(folder / "hellaswag.jsonl", hellaswag),
        ("train", "validation"),
    )
    piqa = [
        {"goal": number(c, g), "sol1": s1, "sol2": s2, "label": label}
        for c in range(copies)
        for g, s1, s2, label in PIQA
    ]
    local_task(
        folder,
        "piqa_local",
        "piqa/piqa.yaml",
        write_jsonl(folder / "piqa.jsonl", piqa),
        ("train", "validation"),
    )
    rolling = write_jsonl(folder / "texts.jsonl", [{"text": t} for t in TEXTS])
    (folder / "rolling_local.yaml").write_text(
        "task: rolling_local\ndataset_path: json\ndataset_kwargs:\n"
        f"  data_files: {json.dumps({'test': rolling})}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    qa = write_jsonl(folder / "qa.jsonl", [{"q": q, "a": a} for q, a in QA])
    (folder / "qa_local.yaml").write_text(
        "task: qa_local\ndataset_path: json\ndataset_kwargs:\n"
        f"  data_files: {json.dumps({'test': qa})}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: 'Question: {{q}}\\nAnswer:'\n"
        "doc_to_target: ' {{a}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n"
        "  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


# rows shaped like google/IFEval's (key, prompt, instruction_id_list, kwargs: one dict per
# instruction, the keys it does not use null), one per kind of checker: case, punctuation,
# sentence count (nltk's punkt_tab), language (langdetect), word count
IFEVAL = [
    ("Write one sentence about the sea. Your entire response should be in English, and in all "
     "lowercase letters.", "change_case:english_lowercase", {}),
    ("What is the capital of France? Do not use any commas in your response.", "punctuation:no_comma", {}),
    ("Describe a cat in fewer than 3 sentences.", "length_constraints:number_sentences",
     {"relation": "less than", "num_sentences": 3}),
    ("Name a fruit and say why you like it. Answer in English.", "language:response_language",
     {"language": "en"}),
    ("Tell me about dogs in fewer than 40 words.", "length_constraints:number_words",
     {"relation": "less than", "num_words": 40}),
]  # fmt: skip


def write_ifeval(folder: Path, max_gen_toks: int = 24) -> Path:
    """ifeval_local in `folder`: lm-eval's IFEval (its checkers and metrics) on IFEVAL's rows,
    replies cut at `max_gen_toks`; and a stand-in for nltk's punkt_tab data (Punkt's
    parameters as files, untrained but for two abbreviations) under folder/nltk_data."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = ("relation", "num_sentences", "num_words", "language", "keywords")
    rows = [
        {"key": i, "prompt": p, "instruction_id_list": [inst], "kwargs": [{k: args.get(k) for k in keys}]}
        for i, (p, inst, args) in enumerate(IFEVAL)
    ]
    data = write_jsonl(folder / "ifeval.jsonl", rows)
    local_task(folder, "ifeval_local", "ifeval/ifeval.yaml", data, splits=("train",))
    with (folder / "ifeval_local.yaml").open("a") as f:
        f.write(f"generation_kwargs:\n  until: []\n  do_sample: false\n  max_gen_toks: {max_gen_toks}\n")
    punkt = folder / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True, exist_ok=True)
    for name, text in [("abbrev_types.txt", "dr\nmr\n"), ("sent_starters.txt", ""),
                       ("collocations.tab", ""), ("ortho_context.tab", "")]:  # fmt: skip
        (punkt / name).write_text(text)
    return folder
