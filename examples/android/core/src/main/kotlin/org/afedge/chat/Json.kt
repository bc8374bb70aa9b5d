package org.afedge.chat

/**
 * A small JSON reader and writer (RFC 8259) for manifest.json, tokenizer.json and safetensors headers, so the core
 * needs only the Kotlin standard library. Objects become LinkedHashMap (key order kept), arrays List, integers Long,
 * other numbers Double.
 */
object Json {
    class ParseError(message: String) : IllegalArgumentException(message)

    fun parse(text: String): Any? {
        val p = Parser(text)
        p.ws()
        val v = p.value()
        p.ws()
        if (p.i != text.length) throw ParseError("trailing characters at offset ${p.i}")
        return v
    }

    fun write(value: Any?): String = StringBuilder().also { emit(value, it) }.toString()

    private fun emit(v: Any?, sb: StringBuilder) {
        when (v) {
            null -> sb.append("null")
            is String -> quote(v, sb)
            is Boolean, is Int, is Long -> sb.append(v.toString())
            is Number -> sb.append(v.toDouble().toString())
            is Map<*, *> -> {
                sb.append('{')
                var first = true
                for ((k, x) in v) {
                    if (!first) sb.append(',')
                    first = false
                    quote(k.toString(), sb)
                    sb.append(':')
                    emit(x, sb)
                }
                sb.append('}')
            }
            is List<*> -> {
                sb.append('[')
                v.forEachIndexed { n, x -> if (n > 0) sb.append(','); emit(x, sb) }
                sb.append(']')
            }
            is LongArray -> emit(v.toList(), sb)
            else -> throw IllegalArgumentException("cannot write ${v.javaClass} as JSON")
        }
    }

    private fun quote(s: String, sb: StringBuilder) {
        sb.append('"')
        for (c in s) {
            when {
                c == '"' -> sb.append("\\\"")
                c == '\\' -> sb.append("\\\\")
                c == '\n' -> sb.append("\\n")
                c.toInt() < 0x20 -> sb.append(String.format("\\u%04x", c.toInt()))
                else -> sb.append(c)
            }
        }
        sb.append('"')
    }

    private class Parser(val s: String) {
        var i = 0

        fun ws() {
            while (i < s.length && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) i++
        }

        fun fail(what: String): Nothing = throw ParseError("$what at offset $i")

        fun value(): Any? {
            if (i >= s.length) fail("unexpected end")
            return when (s[i]) {
                '{' -> obj()
                '[' -> arr()
                '"' -> str()
                't' -> literal("true", true)
                'f' -> literal("false", false)
                'n' -> literal("null", null)
                else -> num()
            }
        }

        fun literal(word: String, v: Any?): Any? {
            if (!s.startsWith(word, i)) fail("bad literal")
            i += word.length
            return v
        }

        fun obj(): Map<String, Any?> {
            val m = LinkedHashMap<String, Any?>()
            i++
            ws()
            if (i < s.length && s[i] == '}') { i++; return m }
            while (true) {
                ws()
                if (i >= s.length || s[i] != '"') fail("expected a key")
                val k = str()
                ws()
                if (i >= s.length || s[i] != ':') fail("expected ':'")
                i++
                ws()
                m[k] = value()
                ws()
                if (i >= s.length) fail("unterminated object")
                if (s[i] == ',') { i++; continue }
                if (s[i] == '}') { i++; return m }
                fail("expected ',' or '}'")
            }
        }

        fun arr(): List<Any?> {
            val a = ArrayList<Any?>()
            i++
            ws()
            if (i < s.length && s[i] == ']') { i++; return a }
            while (true) {
                ws()
                a.add(value())
                ws()
                if (i >= s.length) fail("unterminated array")
                if (s[i] == ',') { i++; continue }
                if (s[i] == ']') { i++; return a }
                fail("expected ',' or ']'")
            }
        }

        fun str(): String {
            val sb = StringBuilder()
            i++
            while (true) {
                if (i >= s.length) fail("unterminated string")
                val c = s[i++]
                when (c) {
                    '"' -> return sb.toString()
                    '\\' -> {
                        if (i >= s.length) fail("bad escape")
                        when (val e = s[i++]) {
                            '"' -> sb.append('"'); '\\' -> sb.append('\\'); '/' -> sb.append('/')
                            'b' -> sb.append('\b'); 'f' -> sb.append('\u000c'); 'n' -> sb.append('\n')
                            'r' -> sb.append('\r'); 't' -> sb.append('\t')
                            'u' -> {
                                if (i + 4 > s.length) fail("bad \\u escape")
                                sb.append(s.substring(i, i + 4).toInt(16).toChar())
                                i += 4
                            }
                            else -> fail("bad escape '\\$e'")
                        }
                    }
                    else -> sb.append(c)
                }
            }
        }

        fun num(): Any {
            val start = i
            while (i < s.length && (s[i].isDigit() || s[i] in "+-.eE")) i++
            val t = s.substring(start, i)
            if (t.length == 0) fail("unexpected character '${s[start]}'")
            return if (t.any { it in ".eE" }) t.toDouble() else t.toLongOrNull() ?: t.toDouble()
        }
    }
}

/** Typed access to parsed JSON, with errors that name the field. */
@Suppress("UNCHECKED_CAST")
internal fun Any?.obj(field: String): Map<String, Any?> =
    this as? Map<String, Any?> ?: throw IllegalArgumentException("'$field' must be a JSON object")

@Suppress("UNCHECKED_CAST")
internal fun Map<String, Any?>.get(key: String, where: String): Any? =
    if (containsKey(key)) this[key] else throw IllegalArgumentException("$where: missing field '$key'")

internal fun Map<String, Any?>.str(key: String, where: String): String =
    get(key, where) as? String ?: throw IllegalArgumentException("$where: field '$key' must be a string")

internal fun Map<String, Any?>.long(key: String, where: String): Long =
    (get(key, where) as? Number)?.toLong() ?: throw IllegalArgumentException("$where: field '$key' must be a number")

internal fun Map<String, Any?>.list(key: String, where: String): List<Any?> =
    get(key, where) as? List<Any?> ?: throw IllegalArgumentException("$where: field '$key' must be an array")

internal fun Map<String, Any?>.child(key: String, where: String): Map<String, Any?> =
    get(key, where).obj("$where.$key")
