"""Language identification: py3langid's model as shipped, and the filter stage keeping the
configured languages with at least 95% precision and recall on a corpus written here."""

from __future__ import annotations

import pytest

from flows.config import ConfigError, load_config
from tasks.filter import FilterConfig, filter_documents
from tasks.language import MODEL_LANGUAGES, identify_language, language_identifier
from tasks.shards import iter_records, write_records

# The same everyday topics in seven languages, so that only the language tells them apart:
# paragraphs of two sentences, and single short sentences, which are harder.
PARAGRAPHS = {
    "en": [
        ('The library opens at nine in the morning and closes at six in the evening. '
         'Visitors can borrow up to ten books at a time, and the reading room on the '
         'second floor is quiet enough for studying.'),
        ('Our train was delayed by almost an hour because of a signal failure near the'
         ' station. When we finally arrived, the hotel had kept our room, and the '
         'receptionist recommended a small restaurant around the corner.'),
        ('To make the bread, mix the flour with warm water, yeast and a pinch of salt.'
         ' Let the dough rest for two hours until it has doubled in size, then bake it'
         ' in a hot oven.'),
        ('The committee will meet next Thursday to discuss the budget for the coming '
         'year. Members who cannot attend are asked to send their comments by email '
         'before the meeting.'),
        ('Researchers measured the temperature of the lake every week for three years.'
         ' They found that the water warmed faster in spring than in autumn, which '
         'affected the fish that live there.'),
        ('My grandmother grew tomatoes, beans and potatoes in the garden behind her '
         'house. Every summer we helped her pick the vegetables, and in the evening '
         'she cooked them for the whole family.'),
    ],
    "de": [
        ('Die Bibliothek öffnet um neun Uhr morgens und schließt um sechs Uhr abends. '
         'Besucher können bis zu zehn Bücher gleichzeitig ausleihen, und der Lesesaal '
         'im zweiten Stock ist ruhig genug zum Lernen.'),
        ('Unser Zug hatte wegen einer Signalstörung fast eine Stunde Verspätung. Als '
         'wir endlich ankamen, hatte das Hotel unser Zimmer noch frei, und die Dame an'
         ' der Rezeption empfahl uns ein kleines Restaurant um die Ecke.'),
        ('Für das Brot vermischt man das Mehl mit warmem Wasser, Hefe und einer Prise '
         'Salz. Der Teig sollte zwei Stunden ruhen, bis er sich verdoppelt hat, und '
         'wird dann im heißen Ofen gebacken.'),
        ('Der Ausschuss trifft sich nächsten Donnerstag, um über den Haushalt für das '
         'kommende Jahr zu sprechen. Mitglieder, die nicht teilnehmen können, werden '
         'gebeten, ihre Anmerkungen vorher per E-Mail zu schicken.'),
        ('Die Forscher haben drei Jahre lang jede Woche die Temperatur des Sees '
         'gemessen. Sie stellten fest, dass sich das Wasser im Frühling schneller '
         'erwärmte als im Herbst, was die Fische im See beeinflusste.'),
        ('Meine Großmutter baute im Garten hinter ihrem Haus Tomaten, Bohnen und '
         'Kartoffeln an. Jeden Sommer halfen wir ihr bei der Ernte, und abends kochte '
         'sie für die ganze Familie.'),
    ],
    "fr": [
        ('La bibliothèque ouvre à neuf heures du matin et ferme à six heures du soir. '
         "Les visiteurs peuvent emprunter jusqu'à dix livres à la fois, et la salle de"
         ' lecture du deuxième étage est assez calme pour étudier.'),
        ("Notre train a eu presque une heure de retard à cause d'une panne de "
         "signalisation. Quand nous sommes enfin arrivés, l'hôtel avait gardé notre "
         'chambre et la réceptionniste nous a conseillé un petit restaurant au coin de'
         ' la rue.'),
        ("Pour faire le pain, mélangez la farine avec de l'eau tiède, de la levure et "
         "une pincée de sel. Laissez reposer la pâte pendant deux heures jusqu'à ce "
         "qu'elle double de volume, puis faites-la cuire dans un four chaud."),
        ("Le comité se réunira jeudi prochain pour discuter du budget de l'année à "
         "venir. Les membres qui ne peuvent pas être présents sont priés d'envoyer "
         'leurs remarques par courriel avant la réunion.'),
        ('Les chercheurs ont mesuré la température du lac chaque semaine pendant trois'
         " ans. Ils ont constaté que l'eau se réchauffait plus vite au printemps qu'en"
         ' automne, ce qui a eu des effets sur les poissons.'),
        ('Ma grand-mère cultivait des tomates, des haricots et des pommes de terre '
         "dans le jardin derrière sa maison. Chaque été, nous l'aidions à cueillir les"
         ' légumes, et le soir elle les cuisinait pour toute la famille.'),
    ],
    "es": [
        ('La biblioteca abre a las nueve de la mañana y cierra a las seis de la tarde.'
         ' Los visitantes pueden llevarse hasta diez libros a la vez, y la sala de '
         'lectura del segundo piso es bastante tranquila para estudiar.'),
        ('Nuestro tren llegó con casi una hora de retraso por una avería en la '
         'señalización. Cuando por fin llegamos, el hotel todavía tenía nuestra '
         'habitación y la recepcionista nos recomendó un pequeño restaurante a la '
         'vuelta de la esquina.'),
        ('Para hacer el pan, mezcla la harina con agua tibia, levadura y una pizca de '
         'sal. Deja reposar la masa durante dos horas hasta que doble su tamaño y '
         'luego hornéala en un horno caliente.'),
        ('El comité se reunirá el próximo jueves para hablar del presupuesto del año '
         'que viene. Se ruega a los miembros que no puedan asistir que envíen sus '
         'comentarios por correo electrónico antes de la reunión.'),
        ('Los investigadores midieron la temperatura del lago cada semana durante tres'
         ' años. Descubrieron que el agua se calentaba más rápido en primavera que en '
         'otoño, lo que afectaba a los peces que viven allí.'),
        ('Mi abuela cultivaba tomates, judías y patatas en el huerto detrás de su '
         'casa. Cada verano la ayudábamos a recoger las verduras, y por la noche las '
         'cocinaba para toda la familia.'),
    ],
    "it": [
        ('La biblioteca apre alle nove del mattino e chiude alle sei di sera. I '
         'visitatori possono prendere in prestito fino a dieci libri alla volta, e la '
         'sala di lettura al secondo piano è abbastanza tranquilla per studiare.'),
        ("Il nostro treno è arrivato con quasi un'ora di ritardo a causa di un guasto "
         "alla segnaletica. Quando finalmente siamo arrivati, l'albergo aveva tenuto "
         'la nostra camera e la receptionist ci ha consigliato un piccolo ristorante '
         "dietro l'angolo."),
        ('Per fare il pane, mescolate la farina con acqua tiepida, lievito e un '
         "pizzico di sale. Lasciate riposare l'impasto per due ore finché non "
         'raddoppia di volume, poi cuocetelo in forno caldo.'),
        ('Il comitato si riunirà giovedì prossimo per discutere il bilancio del '
         'prossimo anno. I membri che non possono partecipare sono pregati di inviare '
         'i loro commenti per posta elettronica prima della riunione.'),
        ('I ricercatori hanno misurato la temperatura del lago ogni settimana per tre '
         "anni. Hanno scoperto che l'acqua si riscaldava più velocemente in primavera "
         'che in autunno, con effetti sui pesci che ci vivono.'),
        ("Mia nonna coltivava pomodori, fagioli e patate nell'orto dietro casa sua. "
         'Ogni estate la aiutavamo a raccogliere le verdure, e la sera le cucinava per'
         ' tutta la famiglia.'),
    ],
    "nl": [
        ("De bibliotheek gaat om negen uur 's ochtends open en sluit om zes uur 's "
         'avonds. Bezoekers mogen tot tien boeken tegelijk lenen, en de leeszaal op de'
         ' tweede verdieping is rustig genoeg om te studeren.'),
        ('Onze trein had bijna een uur vertraging door een seinstoring vlak bij het '
         'station. Toen we eindelijk aankwamen, had het hotel onze kamer nog '
         'vrijgehouden en raadde de receptioniste ons een klein restaurant om de hoek '
         'aan.'),
        ('Voor het brood meng je de bloem met lauw water, gist en een snufje zout. '
         'Laat het deeg twee uur rijzen tot het in omvang verdubbeld is en bak het '
         'daarna in een hete oven.'),
        ('De commissie komt volgende week donderdag bijeen om de begroting voor het '
         'komende jaar te bespreken. Leden die niet aanwezig kunnen zijn, wordt '
         'gevraagd hun opmerkingen vooraf per e-mail te sturen.'),
        ('De onderzoekers hebben drie jaar lang elke week de temperatuur van het meer '
         'gemeten. Ze ontdekten dat het water in de lente sneller opwarmde dan in de '
         'herfst, wat gevolgen had voor de vissen.'),
        ('Mijn oma kweekte tomaten, bonen en aardappelen in de tuin achter haar huis. '
         "Elke zomer hielpen we haar met het plukken van de groenten, en 's avonds "
         'kookte ze voor de hele familie.'),
    ],
    "pt": [
        ('A biblioteca abre às nove horas da manhã e fecha às seis da tarde. Os '
         'visitantes podem levar até dez livros de cada vez, e a sala de leitura do '
         'segundo andar é bastante calma para estudar.'),
        ('O nosso comboio chegou com quase uma hora de atraso por causa de uma avaria '
         'na sinalização. Quando finalmente chegámos, o hotel ainda tinha o nosso '
         'quarto e a rececionista recomendou-nos um pequeno restaurante ao virar da '
         'esquina.'),
        ('Para fazer o pão, misture a farinha com água morna, fermento e uma pitada de'
         ' sal. Deixe a massa descansar durante duas horas até duplicar de volume e '
         'depois coza-a num forno quente.'),
        ('A comissão vai reunir-se na próxima quinta-feira para discutir o orçamento '
         'do próximo ano. Pede-se aos membros que não possam estar presentes que '
         'enviem os seus comentários por correio eletrónico antes da reunião.'),
        ('Os investigadores mediram a temperatura do lago todas as semanas durante '
         'três anos. Descobriram que a água aquecia mais depressa na primavera do que '
         'no outono, o que afetava os peixes que lá vivem.'),
        ('A minha avó cultivava tomates, feijão e batatas na horta atrás de sua casa. '
         'Todos os verões ajudávamos a apanhar os legumes, e à noite ela cozinhava-os '
         'para toda a família.'),
    ],
}
SHORT = {
    "en": [
        'Please close the door when you leave the room.',
        'The weather should improve by the end of the week.',
        'She has lived in this town for twenty years.',
    ],
    "de": [
        'Bitte schließen Sie die Tür, wenn Sie den Raum verlassen.',
        'Das Wetter soll bis zum Ende der Woche besser werden.',
        'Sie wohnt seit zwanzig Jahren in dieser Stadt.',
    ],
    "fr": [
        'Merci de fermer la porte en quittant la pièce.',
        "Le temps devrait s'améliorer d'ici la fin de la semaine.",
        'Elle habite dans cette ville depuis vingt ans.',
    ],
    "es": [
        'Por favor, cierra la puerta cuando salgas de la habitación.',
        'El tiempo debería mejorar hacia el final de la semana.',
        'Ella vive en este pueblo desde hace veinte años.',
    ],
    "it": [
        'Per favore, chiudi la porta quando esci dalla stanza.',
        'Il tempo dovrebbe migliorare entro la fine della settimana.',
        "Lei vive in questa città da vent'anni.",
    ],
    "nl": [
        'Doe alsjeblieft de deur dicht als je de kamer verlaat.',
        'Het weer zou tegen het einde van de week beter moeten worden.',
        'Ze woont al twintig jaar in deze stad.',
    ],
    "pt": [
        'Por favor, feche a porta quando sair da sala.',
        'O tempo deve melhorar até ao fim da semana.',
        'Ela mora nesta cidade há vinte anos.',
    ],
}
DOCUMENTS = [(f"{lang}-{kind}{i}", lang, text)
             for kind, texts in (("paragraph", PARAGRAPHS), ("sentence", SHORT))
             for lang, items in texts.items() for i, text in enumerate(items)]
LANGUAGE_ONLY = {"gopher_enabled": False, "c4": {"enabled": False},
                 "fineweb": {"enabled": False}}


def test_the_identifier_ships_its_model_and_the_labels_we_check_against():
    assert set(language_identifier().labels) == MODEL_LANGUAGES


def test_identify_language_names_the_language_with_a_probability():
    code, score = identify_language(PARAGRAPHS["de"][0])
    assert code == "de" and 0.9 < score <= 1.0
    assert identify_language("") == ("zxx", 0.0)
    assert identify_language(" \n ") == ("zxx", 0.0)


def test_only_the_sample_is_classified():
    # a German page whose first 300 characters are English is English to a 300-char sample
    page = PARAGRAPHS["en"][0] + "\n" + "\n".join(PARAGRAPHS["de"] * 3)
    assert identify_language(page, sample_chars=len(PARAGRAPHS["en"][0]))[0] == "en"
    assert identify_language(page, sample_chars=0)[0] == "de"


@pytest.mark.parametrize("language", sorted(PARAGRAPHS))
def test_the_filter_keeps_the_configured_language_precisely(tmp_path, language):
    """At least 95% precision and recall for each language of the corpus as the one kept
    (through the stage, with the default score threshold)."""
    write_records([{"id": doc_id, "url": f"https://example.org/{doc_id}", "text": text}
                   for doc_id, _, text in DOCUMENTS], tmp_path / "in", shard_size=25)
    config = FilterConfig(languages=[language], **LANGUAGE_ONLY)
    filter_documents(config, tmp_path / "in", tmp_path / "out")
    kept = {r["id"] for r in iter_records(tmp_path / "out" / "data")}
    truth = {doc_id for doc_id, lang, _ in DOCUMENTS if lang == language}
    precision = len(kept & truth) / len(kept)
    recall = len(kept & truth) / len(truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall, kept ^ truth)


def test_every_document_kept_or_removed_carries_its_language(tmp_path):
    write_records([{"id": doc_id, "url": "", "text": text} for doc_id, _, text in DOCUMENTS],
                  tmp_path / "in")
    result = filter_documents(FilterConfig(**LANGUAGE_ONLY), tmp_path / "in", tmp_path / "out")
    rows = [*iter_records(tmp_path / "out" / "data"), *iter_records(tmp_path / "out" / "removed")]
    assert len(rows) == len(DOCUMENTS)
    truth = {doc_id: lang for doc_id, lang, _ in DOCUMENTS}
    assert all(r["language"] == truth[r["id"]] for r in rows)
    assert all(0 < r["language_score"] <= 1 for r in rows)
    removed = list(iter_records(tmp_path / "out" / "removed"))
    assert {r["reason"] for r in removed} == {"language"}
    # the languages seen are statistics (metrics in MLflow)
    assert result["stats"]["language_en"] == len(PARAGRAPHS["en"]) + len(SHORT["en"])
    assert result["stats"]["language_fr"] == len(PARAGRAPHS["fr"]) + len(SHORT["fr"])


def test_no_languages_keeps_every_language(tmp_path):
    write_records([{"id": doc_id, "url": "", "text": text} for doc_id, _, text in DOCUMENTS],
                  tmp_path / "in")
    config = FilterConfig(languages=[], **LANGUAGE_ONLY)
    assert filter_documents(config, tmp_path / "in", tmp_path / "out")["count"] == len(DOCUMENTS)
    assert {r["language"] for r in iter_records(tmp_path / "out" / "data")} == set(PARAGRAPHS)


def test_a_low_score_is_removed_with_its_own_reason(tmp_path):
    mixed = PARAGRAPHS["en"][0] + " " + PARAGRAPHS["de"][0]  # half English, half German
    write_records([{"id": "mixed", "url": "", "text": mixed},
                   {"id": "en", "url": "", "text": PARAGRAPHS["en"][1]}], tmp_path / "in")
    config = FilterConfig(languages=["en", "de"], min_language_score=0.99, **LANGUAGE_ONLY)
    result = filter_documents(config, tmp_path / "in", tmp_path / "out")
    assert result["stats"]["removed_low_language_score"] == 1
    (removed,) = iter_records(tmp_path / "out" / "removed")
    assert removed["id"] == "mixed" and removed["language_score"] < 0.99


def test_language_codes_are_checked_when_the_config_loads():
    assert load_config(None, ["filter.languages=[EN, de]"]).filter.languages == ["en", "de"]
    with pytest.raises(ConfigError) as info:
        load_config(None, ["filter.languages=[english]"])
    assert "filter.languages" in str(info.value) and "ISO 639-1" in str(info.value)
