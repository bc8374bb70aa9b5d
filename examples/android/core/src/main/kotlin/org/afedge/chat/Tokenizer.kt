package org.afedge.chat

import java.io.ByteArrayOutputStream
import java.nio.ByteBuffer
import java.nio.charset.CodingErrorAction
import java.nio.charset.StandardCharsets

/**
 * The byte-level BPE tokenizer of a bundle's tokenizer.json (Hugging Face `tokenizers` format), as afedge writes it:
 * a `ByteLevel` pre-tokenizer with `use_regex = false` and `add_prefix_space = false` (the whole text is one word),
 * a BPE model (vocab + ranked merges; afedge's byte tokenizer has no merges, so ids are byte values) and a
 * `ByteLevel` decoder. Anything else is refused with the field at fault.
 */
class Tokenizer(private val vocab: Map<String, Int>, merges: List<Pair<String, String>>) {
    private val ranks: Map<Pair<String, String>, Int> = merges.withIndex().associate { it.value to it.index }
    private val idToToken: Map<Int, String> = vocab.entries.associate { it.value to it.key }

    val vocabSize: Int get() = (vocab.values.max() ?: -1) + 1

    fun encode(text: String): IntArray {
        val symbols = text.toByteArray(StandardCharsets.UTF_8).map { BYTE_TO_CHAR[it.toInt() and 0xff].toString() }
            .toMutableList()
        while (symbols.size > 1) {
            var best = -1
            var bestRank = Int.MAX_VALUE
            for (j in 0 until symbols.size - 1) {
                val r = ranks[Pair(symbols[j], symbols[j + 1])] ?: continue
                if (r < bestRank) { bestRank = r; best = j }
            }
            if (best < 0) break
            val a = symbols[best]
            val b = symbols[best + 1]
            var j = 0
            val merged = ArrayList<String>(symbols.size)
            while (j < symbols.size) {  // every occurrence of the best pair, left to right
                if (j < symbols.size - 1 && symbols[j] == a && symbols[j + 1] == b) {
                    merged.add(a + b); j += 2
                } else {
                    merged.add(symbols[j]); j += 1
                }
            }
            symbols.clear()
            symbols.addAll(merged)
        }
        return IntArray(symbols.size) { vocab[symbols[it]] ?: throw IllegalArgumentException(
            "tokenizer: symbol '${symbols[it]}' is not in the vocabulary") }
    }

    fun decodeBytes(ids: IntArray): ByteArray {
        val out = ByteArrayOutputStream()
        for (id in ids) {
            val tok = idToToken[id] ?: throw IllegalArgumentException("tokenizer: id $id is not in the vocabulary")
            for (ch in tok) out.write(CHAR_TO_BYTE[ch] ?: throw IllegalArgumentException(
                "tokenizer: token '$tok' is not byte-level"))
        }
        return out.toByteArray()
    }

    /** UTF-8 decoding; an incomplete or invalid sequence becomes U+FFFD (as `tokenizers` does). */
    fun decode(ids: IntArray): String = StandardCharsets.UTF_8.newDecoder()
        .onMalformedInput(CodingErrorAction.REPLACE).onUnmappableCharacter(CodingErrorAction.REPLACE)
        .decode(ByteBuffer.wrap(decodeBytes(ids))).toString()

    companion object {
        /** GPT-2's reversible byte -> printable character table (what ByteLevel pre-tokenisation emits). */
        val BYTE_TO_CHAR: CharArray = run {
            val keep = (('!'.toInt())..('~'.toInt())) + (0xA1..0xAC) + (0xAE..0xFF)
            var extra = 0
            CharArray(256) { b -> if (b in keep) b.toChar() else (256 + extra++).toChar() }
        }
        val CHAR_TO_BYTE: Map<Char, Int> = BYTE_TO_CHAR.withIndex().associate { it.value to it.index }

        fun fromJson(text: String, where: String = "tokenizer.json"): Tokenizer {
            val root = Json.parse(text).obj(where)
            val pre = root.child("pre_tokenizer", where)
            if (pre.str("type", "$where.pre_tokenizer") != "ByteLevel" || pre["use_regex"] != false ||
                pre["add_prefix_space"] != false)
                throw IllegalArgumentException("$where: pre_tokenizer must be ByteLevel with use_regex=false and " +
                    "add_prefix_space=false (got $pre)")
            val model = root.child("model", where)
            if (model.str("type", "$where.model") != "BPE")
                throw IllegalArgumentException("$where: model.type must be BPE")
            val vocab = model.child("vocab", "$where.model").mapValues { (k, v) ->
                (v as? Number)?.toInt() ?: throw IllegalArgumentException("$where: vocab entry '$k' is not a number") }
            val merges = model.list("merges", "$where.model").map { m ->
                when (m) {
                    is String -> m.split(" ").let { if (it.size == 2) Pair(it[0], it[1]) else
                        throw IllegalArgumentException("$where: bad merge '$m'") }
                    is List<*> -> if (m.size == 2) Pair(m[0].toString(), m[1].toString()) else
                        throw IllegalArgumentException("$where: bad merge $m")
                    else -> throw IllegalArgumentException("$where: bad merge $m")
                }
            }
            return Tokenizer(vocab, merges)
        }
    }
}
