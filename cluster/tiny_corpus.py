"""A few KB of plain English used to train the tiny checkpoints' byte-level BPE tokenizer.

The text only shapes which merges the tokenizer learns; any text still tokenizes because the
tokenizer falls back to single bytes. Editing it changes every tiny checkpoint's token ids.
"""

CORPUS = """\
The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea,
there lived an old fisherman and his wife. Every morning he rowed out before the sun came up,
and every evening he came home with a basket of fish, a story, and a little more salt in his
beard. The children of the village would run down to the harbor to meet him, asking what he had
seen on the water that day.

Mixture of experts models route each token to a small number of expert networks. A router, also
called a gate, scores every expert for every token and keeps the top few. Because only a few
experts run for each token, the model can hold many more parameters than it spends compute on.
Serving such a model across many machines means moving tokens to the experts that own them and
moving the results back again, as quickly as the network allows.

In the spring the river rises and floods the low fields. Farmers plant rice, beans, and corn when
the water goes down. By summer the valley is green and warm, and by autumn the harvest is ready.
Winter is quiet: the roads are covered with snow, the market is closed, and people tell stories
by the fire while the wind blows through the pines.

She opened the door, looked at the letter on the table, and smiled. It was from her brother, who
had moved to the city three years ago to study medicine. He wrote that the hospital was busy, that
he worked long nights, and that he missed the smell of bread from their mother's kitchen. "I will
come home for the holidays," he promised, "and I will bring the books you asked for."

What is the capital of France? The capital of France is Paris. What is two plus three? Two plus
three is five. How many days are in a week? There are seven days in a week: Monday, Tuesday,
Wednesday, Thursday, Friday, Saturday, and Sunday. How many months are in a year? There are
twelve months, from January to December, and a year has 365 or 366 days.

Computers store numbers in binary. A byte has eight bits and can hold 256 different values, from
0 to 255. Programs read data from memory, compute new values, and write them back. A good
program is correct first, then clear, and only then fast. When it is slow, measure before you
change anything: the time often goes where you least expect it.

The library was quiet except for the sound of pages turning. Students sat at long wooden tables
with their notes, their laptops, and their coffee. A librarian walked between the shelves,
putting returned books back in their places: history on the left, science on the right, poetry
near the window where the light was best.

Water boils at 100 degrees Celsius at sea level. Light travels about 300,000 kilometers per
second. The Earth goes around the Sun once a year and turns on its axis once a day. The Moon has
no light of its own; it reflects the light of the Sun. Scientists learn these facts by careful
observation, simple models, and many experiments that anyone can repeat.

"Can you help me carry these boxes?" asked the man at the station. "Of course," said the young
woman, and together they lifted the heavy boxes onto the train. He thanked her, and she waved as
the train pulled away. Small kindness, she thought, is the easiest thing in the world to give.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i * 2))
"""
