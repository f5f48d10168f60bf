"""Hand-written material for the planted dirt and the tiny evaluation set.

All text here (including the Korean, German and Chinese documents and the spam) was written for
kumihimo. Every e-mail address, phone number and postal address is fictional (example.* domains,
the 1234-5678 number pattern).
"""

# --- evaluation set: question / passage / answer, used for decontamination -------------------------
EVAL_RECORDS = [
    (
        "ja",
        "潮見町の朝市は毎月いつ開かれるか。",
        "潮見町の朝市は毎月第二日曜日の午前六時から港の広場で開かれ、漁師が前の晩にとった魚や近くの農家の野菜が並ぶ。"
        "売り切れしだい終わるため、地元の人は五時半ごろから列を作って開始を待っている。",
        "毎月第二日曜日",
    ),
    (
        "ja",
        "みどり台図書館で一度に借りられる本は何冊か。",
        "みどり台図書館では、利用者カードを持っている人なら一度に八冊まで本を借りることができる。"
        "貸出期間は二週間で、ほかに予約が入っていなければ窓口か電話で一回だけ延長の手続きができる。",
        "八冊",
    ),
    (
        "ja",
        "カワセミ号が一日に往復する回数は何回か。",
        "観光船カワセミ号は、桜川の河口にある船着き場から上流の石橋までを一日に四往復している。"
        "片道はおよそ四十分で、船頭が川沿いの古い蔵や橋の歴史について説明しながら進む。",
        "四回",
    ),
    (
        "ja",
        "ゆずき小学校の菜園で最初に育てた野菜は何か。",
        "ゆずき小学校の菜園は二十年前に保護者の手で作られ、最初に育てたのはさつまいもだった。"
        "今では五年生が春に苗を植え、秋に収穫したいもを地域のお年寄りと一緒に焼いて食べる行事が続いている。",
        "さつまいも",
    ),
    (
        "ja",
        "灯台坂の名前の由来は何か。",
        "灯台坂という名前は、坂の上にかつて小さな木造の灯台が建っていたことに由来する。"
        "灯台は大正の終わりに役目を終えて取り壊されたが、坂の途中には当時の土台の石が今も残されている。",
        "坂の上に木造の灯台があったこと",
    ),
    (
        "ja",
        "北原パン店の名物パンに使われている豆は何か。",
        "北原パン店の名物は、地元でとれた黒豆を生地に練り込んだ丸いパンで、毎朝七時と十一時の二回だけ焼き上がる。"
        "店主によると、黒豆は前の日の夜から水に浸し、甘さを控えめに煮てから使っているという。",
        "黒豆",
    ),
    (
        "ja",
        "雲見川の花火大会が中止になった年は何年か。",
        "雲見川の花火大会は七十年以上続く行事だが、一九九八年だけは大雨で河川敷が水につかり中止になった。"
        "翌年の大会では、前の年の分も合わせて例年より多い三千発の花火が打ち上げられたと記録されている。",
        "一九九八年",
    ),
    (
        "ja",
        "森野市のごみ収集で、びんと缶が出せるのは何曜日か。",
        "森野市の東地区では、燃えるごみを月曜日と木曜日、びんと缶を水曜日に収集している。"
        "びんは中を軽くすすいでからふたを外し、色ごとに分けずに指定の青いかごへ入れることになっている。",
        "水曜日",
    ),
    (
        "ja",
        "風待ち峠の茶屋で出される名物は何か。",
        "風待ち峠の茶屋では、よもぎを使ったくし団子が名物として知られている。"
        "茶屋は冬の間は休業し、雪が解けて峠道が開通する四月の半ばから十一月の終わりまで営業している。",
        "よもぎのくし団子",
    ),
    (
        "ja",
        "あおば商店街のスタンプを何個集めると景品と交換できるか。",
        "あおば商店街では、五百円の買い物ごとにスタンプを一つ押してもらえる。"
        "台紙にスタンプが二十個たまると、加盟しているどの店でも使える五百円分の買い物券と交換できる。",
        "二十個",
    ),
    (
        "ja",
        "星川天文台の観望会は何時に始まるか。",
        "星川天文台では毎週土曜日に観望会を開いており、夏は午後八時、冬は午後七時から始まる。"
        "曇りや雨の日は望遠鏡を使わず、ドームの中で職員が季節の星座についての話をする。",
        "夏は午後八時、冬は午後七時",
    ),
    (
        "ja",
        "こもれび公園のボートは一回何分乗れるか。",
        "こもれび公園の池では、手こぎボートを一回三十分、三百円で借りることができる。"
        "ボートは一そうに大人三人までが乗れ、小学生以下の子どもは大人と一緒でなければ乗ることができない。",
        "三十分",
    ),
    (
        "en",
        "How often does the Larkfield repair cafe meet?",
        "The Larkfield repair cafe meets on the first Saturday of every month in the old school hall. "
        "Volunteers fix lamps, toasters, clothes and bicycles for free, and visitors are asked only to bring "
        "the broken item and a little patience while they wait for their turn.",
        "On the first Saturday of every month",
    ),
    (
        "en",
        "What color are the recycling bags in Westbrook?",
        "Households in Westbrook put paper and cardboard into blue bags and plastic bottles into clear bags. "
        "Collection happens every other Thursday, and bags left out after eight in the morning may not be "
        "picked up until the following round.",
        "Blue for paper and clear for plastic bottles",
    ),
    (
        "en",
        "Why was the Millbrook footbridge closed?",
        "The Millbrook footbridge was closed for six weeks last spring after inspectors found cracks in two "
        "of its wooden support beams. Walkers were sent around by the road bridge, which added about ten "
        "minutes to the trip between the station and the market.",
        "Cracks were found in two wooden support beams",
    ),
    (
        "en",
        "What does the Harbor Street bakery bake on Fridays?",
        "Every Friday the small bakery on Harbor Street bakes a dark rye loaf with sunflower seeds, and it "
        "usually sells out before noon. The owner learned the recipe from her grandfather, who ran a bakery "
        "in the same building forty years ago.",
        "A dark rye loaf with sunflower seeds",
    ),
    (
        "en",
        "How many plots does the Elm Road community garden have?",
        "The Elm Road community garden is divided into thirty-two plots, each about the size of a parking "
        "space. Plots are assigned by lottery each March, and gardeners agree to spend two hours a month "
        "looking after the shared paths and compost bins.",
        "Thirty-two",
    ),
    (
        "en",
        "When does the Pinecrest observatory hold open nights?",
        "The Pinecrest observatory holds open nights on the last Friday of each month, weather permitting. "
        "Visitors can look through the main telescope for free, and on cloudy evenings a staff member gives "
        "a short talk about the planets instead.",
        "On the last Friday of each month",
    ),
    (
        "en",
        "How long is the loop trail around Lake Arden?",
        "The loop trail around Lake Arden is just over seven kilometers long and mostly flat, with benches "
        "every few hundred meters. Most walkers finish it in about two hours, and the north shore has a small "
        "kiosk that sells tea and sandwiches in summer.",
        "Just over seven kilometers",
    ),
    (
        "en",
        "What is the fine for a late library book in Fernhill?",
        "The Fernhill public library stopped charging fines for late books three years ago. Instead, borrowers "
        "who keep a book more than a month past its due date cannot borrow anything new until the overdue "
        "book has been returned.",
        "There is no fine",
    ),
]

# Sentences introducing an eval passage inside an otherwise normal document.
CONTAM_INTRO_JA = "以前、地域の問題集で次のような文章を読んだことがあります。"
CONTAM_INTRO_EN = "I once came across the following paragraph in a local quiz book."

# --- PII: fictional contact details, planted into otherwise clean documents --------------------------
PII_JA = [
    "ご予約やお問い合わせは、担当の山田までメール(yamada.taro@example.jp)でご連絡ください。",
    "お電話の場合は03-1234-5678へ、平日の午前十時から午後五時までにおかけください。",
    "急ぎの用件は、担当者の携帯電話090-1234-5678でも受け付けています。",
    "海外からお電話いただく場合は、+81-3-1234-5678をご利用ください。",
    "教室の所在地は〒100-0001 東京都千代田区みほん町1-2-3で、駅から歩いて五分ほどです。",
    "感想やご意見は、hanako.suzuki@example.jpまでお気軽にお寄せください。",
    "申し込み用紙は〒530-0001 大阪市北区ためし町4-5-6の事務局まで郵送してください。",
    "会の代表の佐藤さん(電話080-9876-5432)に直接連絡していただいても構いません。",
]
PII_EN = [
    "To book a place, email the organizer at taro.yamada@example.com or call 090-1234-5678.",
    "Callers from outside Japan can reach the office on +81 3 1234 5678 during business hours.",
    "Letters can be sent to 1-2-3 Mihon-cho, Chiyoda-ku, Tokyo 100-0001.",
    "Questions about the schedule can go to hanako@example.org at any time.",
]

# --- documents in other languages (original text) ----------------------------------------------------
OTHER_LANG = {
    "ko": [
        "주말 아침이면 동네 공원을 한 바퀴 걷는 것이 요즘 나의 작은 습관이 되었다. "
        "날씨가 좋은 날에는 강아지를 데리고 나온 이웃들이 많아서 서로 가볍게 인사를 나눈다.\n"
        "공원 입구 근처에는 작은 빵집이 있는데, 갓 구운 식빵 냄새가 골목 끝까지 퍼진다. "
        "나는 산책을 마치고 그 빵집에 들러 우유 식빵 하나와 따뜻한 커피 한 잔을 산다. "
        "주인 아주머니는 늘 오늘 가장 잘 구워진 빵이 무엇인지 웃으면서 알려 주신다.\n"
        "집에 돌아와 창가에 앉아 빵을 먹으며 한 주 동안 있었던 일을 천천히 떠올린다. "
        "바쁜 평일에는 느끼기 어려운 여유가 이 짧은 시간 안에 담겨 있다. "
        "가을이 되면 공원의 은행나무가 노랗게 물들어 사진을 찍으러 오는 사람들로 붐빈다. "
        "그래도 이른 아침에는 아직 조용해서 새소리를 들으며 걸을 수 있다. "
        "다음 주에는 오랜 친구에게도 이 산책 길을 소개해 주고 싶다.",
        "겨울이 오기 전에 우리 가족은 해마다 할머니 댁에 모여 김장을 한다. "
        "아침 일찍 배추를 소금에 절여 두고, 그동안 어른들은 무와 파를 썰어 양념을 만든다.\n"
        "아이들은 마늘 껍질을 까거나 빈 통을 씻는 일을 맡는데, 올해는 조카가 처음으로 양념 바르기에 도전했다. "
        "손이 빨갛게 물들었지만 본인이 만든 김치를 가져가겠다며 무척 즐거워했다.\n"
        "점심에는 갓 버무린 김치와 삶은 돼지고기를 함께 먹는 것이 우리 집의 오래된 전통이다. "
        "일은 힘들어도 온 가족이 한자리에 모여 이야기를 나누는 시간이 참 소중하게 느껴진다. "
        "할머니는 해마다 올해가 마지막이라고 말씀하시지만, 다음 해가 되면 또 가장 먼저 준비를 시작하신다. "
        "이렇게 만든 김치는 각자의 집으로 나누어 가져가 겨우내 식탁을 책임진다.",
    ],
    "zh": [
        "我家附近有一个早市，每天清晨五点多就开始热闹起来。"
        "卖菜的大多是附近村子的农民，他们把刚摘下来的青菜和萝卜摆在小推车上，价格比超市便宜不少。\n"
        "我最喜欢的是市场尽头的一家豆浆摊，老板每天凌晨就起来磨豆子，豆浆又香又浓。"
        "排队的人虽然很多，但大家都很有耐心，一边等一边聊天气和孩子的事情。\n"
        "逛早市的乐趣不只在于买东西，更在于感受这座城市一天刚刚开始时的生活气息。"
        "周末有空的时候，我常常带着父母一起去，他们总能和摊主们聊上好一阵子。"
        "回家的路上，篮子里装满了新鲜的蔬菜，心里也觉得格外踏实。\n"
        "听说明年这片空地要重新规划，早市可能会搬到河边的广场去。"
        "很多老顾客都担心以后走路会远一些，不过摊主们说，只要大家还愿意来，他们就会一直摆下去。",
        "去年秋天，我开始学习用电饭锅做简单的饭菜。"
        "一开始我连米和水的比例都掌握不好，做出来的饭不是太硬就是太软。\n"
        "后来我在笔记本上记下每一次的做法，慢慢找到了适合自己的方法。"
        "现在我已经能做出土豆炖鸡和番茄鸡蛋汤，周末还会请朋友来家里一起吃饭。\n"
        "我发现做饭其实没有想象中那么难，只要有耐心，每一次都会比上一次做得更好。"
        "自己做饭不仅省钱，也让我更加注意饮食的均衡。"
        "下一步我想试着学做饺子，希望过年的时候能包给家人吃。\n"
        "朋友告诉我，包饺子最难的是擀皮，要多练习几次才能擀得又圆又薄。"
        "我打算先从买现成的饺子皮开始，等熟练了以后再自己和面。"
        "如果成功了，我会把做法整理成一篇小文章，分享给同样刚开始学做饭的朋友们。",
    ],
    "de": [
        "Seit dem Frühjahr fahre ich jeden Morgen mit dem Fahrrad zur Arbeit. "
        "Die Strecke ist ungefähr acht Kilometer lang und führt zum größten Teil an einem kleinen Fluss entlang.\n"
        "Am Anfang war ich nach der Fahrt ziemlich müde, aber schon nach zwei Wochen ging es viel leichter. "
        "Bei Regen ziehe ich eine dünne Regenjacke an und nehme trockene Socken im Rucksack mit.\n"
        "Unterwegs sehe ich oft dieselben Menschen, zum Beispiel einen älteren Herrn, der mit seinem Hund spazieren geht. "
        "Wir grüßen uns inzwischen jeden Tag, obwohl wir noch nie ein richtiges Gespräch geführt haben. "
        "Im Büro komme ich wacher an als früher mit dem Bus, und abends fühlt sich der Heimweg wie eine kleine Pause an. "
        "Im Winter werde ich vielleicht wieder öfter die Bahn nehmen, aber bis dahin genieße ich die frische Luft.",
        "Am Samstag habe ich zum ersten Mal selbst Brot gebacken. "
        "Ich habe ein einfaches Rezept mit Mehl, Wasser, Salz und etwas Hefe ausgewählt.\n"
        "Der Teig musste mehrere Stunden ruhen, deshalb habe ich in der Zwischenzeit die Küche aufgeräumt und ein Buch gelesen. "
        "Als ich das Brot aus dem Ofen geholt habe, roch die ganze Wohnung wunderbar.\n"
        "Die Kruste war etwas zu dunkel, aber innen war das Brot weich und locker. "
        "Meine Nachbarin hat ein Stück probiert und mir geraten, das nächste Mal die Temperatur ein wenig zu senken. "
        "Ich möchte jetzt jede Woche ein anderes Brot ausprobieren und mir die Ergebnisse in einem Heft notieren.",
    ],
}

# --- too short ----------------------------------------------------------------------------------------
SHORT_JA = [
    "本日は臨時休業とさせていただきます。",
    "詳しくはこちらをご覧ください。",
    "ありがとうございました。またのご来店をお待ちしております。",
    "ページが見つかりません。URLをご確認ください。",
    "新着情報はまだありません。",
]
SHORT_EN = [
    "Click here to read more.",
    "This page is under construction.",
    "Thanks for visiting! See you next time.",
    "404 - the page you requested could not be found.",
]

# --- NG-word spam (tame) ------------------------------------------------------------------------------
SPAM_JA_WORDS = [
    "カジノ",
    "無料",
    "ボーナス",
    "今すぐ登録",
    "高額当選",
    "限定",
    "激安",
    "必勝法",
    "ポイント倍増",
    "簡単に稼げる",
]
SPAM_EN_WORDS = [
    "casino",
    "free",
    "bonus",
    "win",
    "jackpot",
    "click now",
    "cheap",
    "limited offer",
    "no deposit",
    "easy money",
]

# --- boilerplate -------------------------------------------------------------------------------------
BOILER_JA = {
    "nav": "ホーム | 会社概要 | サービス | 製品情報 | よくある質問 | お問い合わせ | サイトマップ",
    "cookie": "当サイトでは、利便性の向上とアクセス解析のためにクッキーを使用しています。"
    "サイトの閲覧を続けることで、クッキーの使用に同意したものとみなされます。[同意する] [詳細]",
    "login": "ログイン | 新規会員登録 | カートを見る",
    "share": "この記事をシェアする",
    "copyright": "Copyright (c) 2024 Example Shoji Co., Ltd. All rights reserved.",
    "footer": "プライバシーポリシー | 利用規約 | 特定商取引法に基づく表記",
    "pagetop": "ページの先頭へ戻る",
}
BOILER_EN = {
    "nav": "Home | About Us | Services | Products | FAQ | Contact | Sitemap",
    "cookie": "We use cookies to improve your experience and analyze traffic. "
    "By continuing to browse this site you agree to our use of cookies. [Accept] [Learn more]",
    "login": "Sign in | Register | View cart",
    "share": "Share this post",
    "copyright": "Copyright (c) 2024 Example Corp. All rights reserved.",
    "footer": "Privacy Policy | Terms of Use | Accessibility",
    "pagetop": "Back to top",
}
