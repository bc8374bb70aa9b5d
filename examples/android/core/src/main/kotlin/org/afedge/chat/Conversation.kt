package org.afedge.chat

/** The dialogue format of the demo model (afedge/demo/format.py): `U: <user>\nA: <reply>\n`. */
object ChatFormat {
    const val USER = "U: "
    const val BOT = "A: "
    const val EOL = "\n"

    fun prompt(user: String): String = "$USER$user$EOL$BOT"
}

/** A conversation's resumable position: the state, the pending token ids and how many tokens the state has seen. */
class Snapshot(val state: List<FloatArray>, val pending: IntArray, val tokensSeen: Long)

/**
 * The generation loop of `afedge chat`, over any [StepRunner]: each turn feeds only its own tokens (whole
 * `prefillLen` blocks through `prefill`, the rest through `step`) on the current state, then decodes greedily until
 * the newline that ends the reply. That newline is fed with the next turn. Memory stays constant: the state is the
 * contract's fixed tensors and no transcript is kept.
 */
class Conversation(
    private val runner: StepRunner,
    private val tokenizer: Tokenizer,
    private val manifest: Manifest,
    private val maxNew: Int = 64
) {
    private val eol: Int = tokenizer.encode(ChatFormat.EOL).let {
        if (it.size != 1) throw IllegalArgumentException("the tokenizer must encode a newline as one token")
        it[0]
    }
    var state: List<FloatArray> = manifest.initState()
        private set
    var pending: IntArray = IntArray(0)
        private set
    var tokensSeen: Long = 0
        private set

    /** Feed one user turn; `onText` receives the reply piece by piece as it is decoded. */
    fun say(user: String, onText: (String) -> Unit = {}): String {
        val ids = pending + tokenizer.encode(ChatFormat.prompt(user))
        var out = feed(ids, state)
        tokensSeen += ids.size
        val reply = ArrayList<Int>()
        var shown = ""
        for (n in 0 until maxNew) {
            val next = argmax(out.logits)
            if (next == eol) break
            reply.add(next)
            out = runner.step(next.toLong(), out.state)
            val text = tokenizer.decode(reply.toIntArray())
            if (!text.endsWith("\uFFFD")) {  // wait for the rest of a multi-byte character
                onText(text.substring(shown.length))
                shown = text
            }
        }
        tokensSeen += reply.size
        state = out.state
        pending = intArrayOf(eol)
        val text = tokenizer.decode(reply.toIntArray())
        if (text != shown) onText(text.substring(shown.length))
        return text
    }

    fun reset() {
        state = manifest.initState()
        pending = IntArray(0)
        tokensSeen = 0
    }

    fun snapshot(): Snapshot = Snapshot(state, pending.copyOf(), tokensSeen)

    fun restore(s: Snapshot) {
        if (s.state.size != manifest.slots.size || s.state.zip(manifest.slots).any { (t, slot) -> t.size != slot.numel })
            throw IllegalArgumentException("snapshot does not match the state contract")
        state = s.state
        pending = s.pending.copyOf()
        tokensSeen = s.tokensSeen
    }

    val stateBytes: Long get() = state.map { it.size * 4L }.sum()

    private fun feed(ids: IntArray, start: List<FloatArray>): StepOutput {
        val n = manifest.prefillLen
        val full = ids.size - ids.size % n
        var s = start
        var out: StepOutput? = null
        for (a in 0 until full step n) {
            out = runner.prefill(LongArray(n) { ids[a + it].toLong() }, s)
            s = out.state
        }
        for (t in full until ids.size) {
            out = runner.step(ids[t].toLong(), s)
            s = out.state
        }
        return out ?: throw IllegalArgumentException("a turn must feed at least one token")
    }

    companion object {
        /** Index of the largest logit, the first one on ties (numpy's argmax). */
        fun argmax(x: FloatArray): Int {
            var best = 0
            for (i in 1 until x.size) if (x[i] > x[best]) best = i
            return best
        }
    }
}
