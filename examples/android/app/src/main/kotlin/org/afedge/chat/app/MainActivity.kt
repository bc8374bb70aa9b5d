package org.afedge.chat.app

import android.app.Activity
import android.os.Bundle
import android.view.inputmethod.EditorInfo
import android.widget.Button
import android.widget.EditText
import android.widget.ScrollView
import android.widget.TextView
import java.io.File
import java.util.concurrent.Executors
import org.afedge.chat.Conversation
import org.afedge.chat.Manifest
import org.afedge.chat.StateFile
import org.afedge.chat.Tokenizer

/**
 * A chat screen over an afedge bundle pushed to `<external files>/bundle/` (see README.md). Replies stream in
 * token by token; after every turn the conversation state is written to `session.safetensors` (the same format as
 * `afedge chat`'s /save), so the conversation survives an app restart.
 */
class MainActivity : Activity() {
    private val worker = Executors.newSingleThreadExecutor()
    private var conv: Conversation? = null
    private var runner: ExecuTorchRunner? = null
    private var manifest: Manifest? = null
    private lateinit var transcript: TextView
    private lateinit var status: TextView
    private lateinit var scroll: ScrollView
    private val sessionFile by lazy { File(filesDir, "session.safetensors") }
    private val transcriptFile by lazy { File(filesDir, "transcript.txt") }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        transcript = findViewById(R.id.transcript)
        status = findViewById(R.id.status)
        scroll = findViewById(R.id.scroll)
        val input = findViewById<EditText>(R.id.input)
        val send = { val text = input.text.toString().trim(); if (text.isNotEmpty()) { input.setText(""); say(text) } }
        findViewById<Button>(R.id.send).setOnClickListener { send() }
        input.setOnEditorActionListener { _, id, _ -> if (id == EditorInfo.IME_ACTION_SEND) { send(); true } else false }
        findViewById<Button>(R.id.reset).setOnClickListener { reset() }
        if (transcriptFile.isFile) transcript.text = transcriptFile.readText()
        worker.execute { open() }
    }

    private fun open() {
        val dir = File(getExternalFilesDir(null), "bundle")
        try {
            val m = Manifest.fromJson(File(dir, "manifest.json").readText())
            val tok = Tokenizer.fromJson(File(dir, m.tokenizerFile).readText())
            val r = ExecuTorchRunner(File(dir, m.pteFile()).path, m)
            val c = Conversation(r, tok, m)
            var note = ""
            if (sessionFile.isFile) {
                note = try {
                    c.restore(StateFile.load(sessionFile, m)); "restored the saved conversation"
                } catch (e: StateFile.Refused) {
                    "saved conversation not restored: ${e.message}"
                }
            }
            if (m.executorchVersion != null && m.executorchVersion != BuildConfig.EXECUTORCH_VERSION)
                note += " (bundle written by executorch ${m.executorchVersion}, app has ${BuildConfig.EXECUTORCH_VERSION})"
            manifest = m; runner = r; conv = c
            runOnUiThread { showStatus(note) }
        } catch (e: Exception) {
            runOnUiThread { status.text = "cannot open the bundle in $dir: ${e.message} (see README.md: adb push)" }
        }
    }

    private fun say(text: String) {
        append("you> $text\nbot> ")
        worker.execute {
            val c = conv ?: return@execute
            val m = manifest ?: return@execute
            val t0 = System.nanoTime()
            val before = c.tokensSeen
            c.say(text) { piece -> runOnUiThread { append(piece) } }
            val tokS = (c.tokensSeen - before) / ((System.nanoTime() - t0) / 1e9)
            StateFile.save(sessionFile, c.snapshot(), m)
            runOnUiThread {
                append("\n")
                saveTranscript()
                showStatus("%.0f tokens/s".format(tokS))
            }
        }
    }

    private fun reset() {
        worker.execute {
            conv?.reset()
            sessionFile.delete()
            runOnUiThread { transcript.text = ""; saveTranscript(); showStatus("new conversation") }
        }
    }

    private fun append(s: String) {
        transcript.append(s)
        scroll.post { scroll.fullScroll(ScrollView.FOCUS_DOWN) }
    }

    /** The on-screen transcript is kept to its last 20k characters (the model itself needs none of it). */
    private fun saveTranscript() {
        val text = transcript.text.toString().takeLast(20_000)
        val tmp = File(filesDir, ".transcript.tmp")
        tmp.writeText(text)
        tmp.renameTo(transcriptFile)
    }

    private fun showStatus(note: String) {
        val c = conv ?: return
        status.text = "state ${c.stateBytes} bytes, ${c.tokensSeen} tokens seen. $note"
    }

    override fun onDestroy() {
        worker.execute { runner?.close() }
        worker.shutdown()
        super.onDestroy()
    }
}
